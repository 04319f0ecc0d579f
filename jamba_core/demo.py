"""The main job, end to end: a long real document answered through LlamaIndex and LangChain.

`make demo` runs this module. The model: ``--model`` (a real checkpoint folder or Hub id), else the
small Jamba trained by this project (`checkpoints/jamba-tiny-chat`, `jamba_core.train`), else (or with
``--random``) a small random-weight checkpoint made on the spot. It loads a long document (default: the
Python standard library's own documentation of a few modules, present on every machine; ``--document
PATH`` for any text file); with the trained checkpoint, which was trained to find facts in long texts
and to call tools, not to summarise, it hides a fact in the document (RULER's "special magic number"
needle, `jamba_core.eval.ruler`) and asks for it. Then

1. LlamaIndex: a `SummaryIndex` over the document, queried through `JambaLLM` with ``compact``
   packing, budgeted with the checkpoint's own tokenizer, so the whole document goes into one call
   where it fits the context window (its chunks split without overlap: every chunk reaches the model,
   and the default 200-token overlap would send a fifth of the document twice);
2. LangChain: a chain ``prompt | ChatJamba | StrOutputParser`` with the document in the prompt;
3. LangChain tools (trained or real checkpoints): ``ChatJamba.bind_tools([get_weather])`` and the
   parsed ``tool_calls``;

and prints the answers (and whether they hold the hidden fact), prompt tokens, time to first token,
prefill and decode tokens/s and cache bytes.
"""

from __future__ import annotations

import argparse
import pydoc
import random
import sys
import time
from pathlib import Path

DEFAULT_CHECKPOINT = Path(".checkpoints")
STDLIB_MODULES = ("json", "textwrap", "heapq", "bisect", "fractions")
QUESTION = "What is this document about? Answer in one sentence."
NEEDLE_KEYS = ("amber-lantern", "quiet-harbor", "silver-compass", "copper-anchor", "hollow-beacon")


def hide_needle(text: str, seed: int = 0, depth: float = 0.6, key: str | None = None,
                value: str | None = None) -> tuple[str, str, str, str]:
    """``text`` with RULER's needle ("One of the special magic numbers for KEY is: VALUE.") inserted as
    a paragraph at ``depth`` (0..1) of its paragraphs; returns (text, needle, question, value). ``key`` and
    ``value`` default to a seeded choice of `NEEDLE_KEYS` and a seeded 7-digit number."""
    from jamba_core.eval.ruler import _NIAH_NEEDLE, _NIAH_QUESTION

    rng = random.Random(seed)
    key, value = key or rng.choice(NEEDLE_KEYS), value or str(rng.randint(1_000_000, 9_999_999))
    paragraphs = text.split("\n\n")
    at = int(len(paragraphs) * depth)
    needle = _NIAH_NEEDLE.format(key=key, value=value)
    return "\n\n".join(paragraphs[:at] + [needle] + paragraphs[at:]), needle, _NIAH_QUESTION.format(key=key), value


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny in {city}."


def stdlib_documentation() -> str:
    """Plain-text documentation of a few standard-library modules (pydoc), on every Python install."""
    return "\n\n".join(pydoc.plain(pydoc.render_doc(name, renderer=pydoc.plaintext)) for name in STDLIB_MODULES)


def _report(title: str, answer: str, engine, value: str | None = None) -> None:
    stats = engine.last_request
    t, u = stats["timings"], stats["usage"]
    print(f"\n== {title}")
    print(f"answer: {answer.strip()!r}" + ("" if value is None else f"   (holds the hidden {value}: {'yes' if value in answer else 'no'})"))
    print(f"prompt tokens: {u.prompt_tokens:,}   new tokens: {u.completion_tokens}")
    print(f"time to first token: {t.time_to_first_token_s:.2f} s   prefill: {t.prefill_tokens_per_s:,.0f} tokens/s   "
          f"decode: {t.decode_tokens_per_s:,.1f} tokens/s")
    print(f"cache: {stats['cache_nbytes'] / 2**20:,.1f} MiB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jamba-local demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Jamba checkpoint folder or Hub id (default: the trained small checkpoint in "
                                             "checkpoints/, else a small random one made here)")
    parser.add_argument("--random", action="store_true", help="use a small random-weight checkpoint even where the trained one exists")
    parser.add_argument("--preset", default="tiny", help="preset of the random checkpoint: tiny or bench-small")
    parser.add_argument("--document", type=Path, help="a text file (default: Python stdlib documentation)")
    parser.add_argument("--max-document-chars", type=int, default=None, help="cut the document to this many characters")
    parser.add_argument("--question", default=None, help=f"default: the hidden fact's question, or {QUESTION!r}")
    parser.add_argument("--needle", action=argparse.BooleanOptionalAction, default=None,
                        help="hide a fact in the document and ask for it (default: with the trained checkpoint)")
    parser.add_argument("--seed", type=int, default=0, help="the hidden fact's key and value")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from llama_index.core import Document, SummaryIndex
    from llama_index.core.node_parser import SentenceSplitter

    from jamba_core.engine import get_engine
    from jamba_core.testing import make_checkpoint, trained_checkpoint
    from langchain_jamba import ChatJamba
    from llama_index_jamba import JambaLLM, use_jamba_tokenizer

    t0 = time.perf_counter()
    default = None if args.random else trained_checkpoint(missing_ok=True)
    if args.model:
        model, kind = args.model, "real weights"
    elif default is not None:
        model, kind = str(default), "the small Jamba trained by this project (needles, tools, JSON; python -m jamba_core.train)"
    else:
        model, kind = str(make_checkpoint(DEFAULT_CHECKPOINT / args.preset, preset=args.preset)), "random weights: the answers below are noise"
    trained = default is not None and model == str(default)
    engine = get_engine(model, dtype=args.dtype)
    if args.document:
        text, source = args.document.read_text(encoding="utf-8"), str(args.document)
    else:
        text, source = stdlib_documentation(), "Python stdlib documentation (" + ", ".join(STDLIB_MODULES) + ")"
    if args.max_document_chars:
        text = text[: args.max_document_chars]
    needle = value = None
    if args.needle if args.needle is not None else trained:
        text, needle, question, value = hide_needle(text, args.seed)
        question = args.question or question
    else:
        question = args.question or QUESTION
    doc_tokens = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    print(f"checkpoint: {model} ({kind})")
    print(f"document: {source}: {len(text):,} characters, {doc_tokens:,} tokens; context window {engine.context_window:,} tokens")
    if needle is not None:
        print(f"hidden in it at 60% of its paragraphs: {needle!r}")
    print(f"question: {question!r}")
    print(f"loaded in {time.perf_counter() - t0:.1f} s")

    llm = JambaLLM(model=model, dtype=args.dtype, max_new_tokens=args.max_new_tokens)
    use_jamba_tokenizer(llm)  # LlamaIndex budgets with the checkpoint's tokenizer, not tiktoken
    index = SummaryIndex.from_documents([Document(text=text, metadata={"source": source})],
                                        transformations=[SentenceSplitter(chunk_overlap=0)])
    calls = count_llm_calls()
    answer = index.as_query_engine(llm=llm, response_mode="compact").query(question)
    _report(f"LlamaIndex SummaryIndex, compact ({calls.count} LLM call{'s' if calls.count != 1 else ''})", str(answer), engine, value)

    chat = ChatJamba(model=model, dtype=args.dtype, max_tokens=args.max_new_tokens)
    prompt = ChatPromptTemplate.from_messages([
        ("system", "Answer from this document:\n\n{document}"),
        ("human", "{question}"),
    ])
    chain = prompt | chat | StrOutputParser()
    _report("LangChain prompt | ChatJamba | StrOutputParser", chain.invoke({"document": text, "question": question}), engine, value)
    if args.model or trained:
        request = "What is the weather in Nantucket?"
        reply = chat.bind_tools([get_weather]).invoke(request)
        print(f"\n== LangChain ChatJamba.bind_tools([get_weather]).invoke({request!r})")
        print(f"tool_calls: {[{'name': c['name'], 'args': c['args']} for c in reply.tool_calls]}   content: {reply.content!r}")
    if kind.startswith("random"):
        print("\n(random-weight checkpoint: the pipeline is real, the words are noise; pass --model for a real Jamba)")
    return 0


def count_llm_calls():
    """A LlamaIndex event handler counting LLM chat/completion calls (through its instrumentation)."""
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler
    from llama_index.core.instrumentation.events.llm import LLMChatStartEvent, LLMCompletionStartEvent

    class CallCounter(BaseEventHandler):
        count: int = 0

        @classmethod
        def class_name(cls) -> str:
            return "CallCounter"

        def handle(self, event, **kwargs) -> None:
            if isinstance(event, (LLMChatStartEvent, LLMCompletionStartEvent)):
                self.count += 1

    counter = CallCounter()
    get_dispatcher().add_event_handler(counter)
    return counter


if __name__ == "__main__":
    from .cli import _run

    sys.exit(_run("demo", main, sys.argv[1:]))
