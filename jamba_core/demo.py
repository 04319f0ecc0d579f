"""The main job, end to end: a long real document answered through LlamaIndex and LangChain.

`make demo` runs this module. It makes (or reuses) a small checkpoint unless ``--model`` names a real
one, loads a long document (default: the Python standard library's own documentation of a few
modules, present on every machine; ``--document PATH`` for any text file), then

1. LlamaIndex: a `SummaryIndex` over the document, queried through `JambaLLM` with ``compact``
   packing, budgeted with the checkpoint's own tokenizer, so the whole document goes into one call
   where it fits the context window;
2. LangChain: a chain ``prompt | ChatJamba | StrOutputParser`` with the document in the prompt;

and prints the answers, prompt tokens, time to first token, prefill and decode tokens/s and cache bytes.
"""

from __future__ import annotations

import argparse
import pydoc
import sys
import time
from pathlib import Path

DEFAULT_CHECKPOINT = Path(".checkpoints")
STDLIB_MODULES = ("json", "textwrap", "heapq", "bisect", "fractions")
QUESTION = "What is this document about? Answer in one sentence."


def stdlib_documentation() -> str:
    """Plain-text documentation of a few standard-library modules (pydoc), on every Python install."""
    return "\n\n".join(pydoc.plain(pydoc.render_doc(name, renderer=pydoc.plaintext)) for name in STDLIB_MODULES)


def _report(title: str, answer: str, engine) -> None:
    stats = engine.last_request
    t, u = stats["timings"], stats["usage"]
    print(f"\n== {title}")
    print(f"answer: {answer.strip()!r}")
    print(f"prompt tokens: {u.prompt_tokens:,}   new tokens: {u.completion_tokens}")
    print(f"time to first token: {t.time_to_first_token_s:.2f} s   prefill: {t.prefill_tokens_per_s:,.0f} tokens/s   "
          f"decode: {t.decode_tokens_per_s:,.1f} tokens/s")
    print(f"cache: {stats['cache_nbytes'] / 2**20:,.1f} MiB")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jamba-local demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a real Jamba checkpoint folder or Hub id (default: a small random one made here)")
    parser.add_argument("--preset", default="tiny", help="preset of the small checkpoint: tiny or bench-small")
    parser.add_argument("--document", type=Path, help="a text file (default: Python stdlib documentation)")
    parser.add_argument("--max-document-chars", type=int, default=None, help="cut the document to this many characters")
    parser.add_argument("--question", default=QUESTION)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from llama_index.core import Document, SummaryIndex

    from jamba_core.engine import get_engine
    from jamba_core.testing import make_checkpoint
    from langchain_jamba import ChatJamba
    from llama_index_jamba import JambaLLM, use_jamba_tokenizer

    t0 = time.perf_counter()
    model = args.model or str(make_checkpoint(DEFAULT_CHECKPOINT / args.preset, preset=args.preset))
    engine = get_engine(model, dtype=args.dtype)
    if args.document:
        text, source = args.document.read_text(encoding="utf-8"), str(args.document)
    else:
        text, source = stdlib_documentation(), "Python stdlib documentation (" + ", ".join(STDLIB_MODULES) + ")"
    if args.max_document_chars:
        text = text[: args.max_document_chars]
    doc_tokens = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    print(f"checkpoint: {model} ({'random weights: the answers below are noise' if not args.model else 'real weights'})")
    print(f"document: {source}: {len(text):,} characters, {doc_tokens:,} tokens; context window {engine.context_window:,} tokens")
    print(f"loaded in {time.perf_counter() - t0:.1f} s")

    llm = JambaLLM(model=model, dtype=args.dtype, max_new_tokens=args.max_new_tokens)
    use_jamba_tokenizer(llm)  # LlamaIndex budgets with the checkpoint's tokenizer, not tiktoken
    index = SummaryIndex.from_documents([Document(text=text, metadata={"source": source})])
    calls = count_llm_calls()
    answer = index.as_query_engine(llm=llm, response_mode="compact").query(args.question)
    _report(f"LlamaIndex SummaryIndex, compact ({calls.count} LLM call{'s' if calls.count != 1 else ''})", str(answer), engine)

    chat = ChatJamba(model=model, dtype=args.dtype, max_tokens=args.max_new_tokens)
    prompt = ChatPromptTemplate.from_messages([
        ("system", "Answer from this document:\n\n{document}"),
        ("human", "{question}"),
    ])
    chain = prompt | chat | StrOutputParser()
    _report("LangChain prompt | ChatJamba | StrOutputParser", chain.invoke({"document": text, "question": args.question}), engine)
    if not args.model:
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
    sys.exit(main())
