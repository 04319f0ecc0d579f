"""`JambaLLM`: a LlamaIndex `FunctionCallingLLM` over the local Jamba engine.

The class translates, nothing more: LlamaIndex `ChatMessage`s become the OpenAI-shaped dicts that
`jamba_core.chat.api` reads, and its `ChatResult` / streamed events become `ChatResponse`s. Rendering,
tool-call grammar, JSON-schema decoding, parsing and usage all live in `jamba_core`.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, Union

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CitableBlock,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    DocumentBlock,
    LLMMetadata,
    LogProb,
    MessageRole,
    TextBlock,
    ThinkingBlock,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.llm import (
    LLMStructuredPredictEndEvent,
    LLMStructuredPredictInProgressEvent,
    LLMStructuredPredictStartEvent,
)
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection
from llama_index.core.llms.utils import parse_partial_json
from llama_index.core.program.utils import process_streaming_objects
from llama_index.core.prompts import PromptTemplate
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore
from llama_index.core.types import PydanticProgramMode

from jamba_core.aio import iterate_in_thread
from jamba_core.chat.api import ChatDone, ChatResult, ContentDelta, InvalidToolCall, ReasoningDelta, ToolCallChunk, chat, chat_stream
from jamba_core.engine import Engine, get_engine, warn_unknown_options

dispatcher = get_dispatcher(__name__)

_GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop")
_REQUEST_KEYS = ("tools", "tool_choice", "documents", "citations", "response_format")
_LOGPROB_KEYS = ("logprobs", "top_logprobs")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "chatbot": "assistant", "model": "assistant", "tool": "tool", "function": "tool"}


class JambaLLM(FunctionCallingLLM):
    """A Jamba checkpoint run in this process, as a LlamaIndex chat and function-calling LLM.

    Setup:
        ``pip install "jamba-local[llama-index]"``. ``model`` is a checkpoint folder (config.json,
        safetensors, tokenizer) or a Hub id available offline. The weights load on the first
        generation, once per process for a checkpoint and settings (`jamba_core.engine.get_engine`);
        ``metadata`` reads only ``config.json``.

    Instantiate:
        .. code-block:: python

            from llama_index_jamba import JambaLLM

            llm = JambaLLM(model="ai21labs/AI21-Jamba-Mini-1.7", max_new_tokens=512, dtype="bfloat16")
            llm.metadata.context_window      # 262144: the checkpoint's max_position_embeddings

    Invoke and stream:
        .. code-block:: python

            llm.complete("Name a whale.").text
            for r in llm.stream_chat([ChatMessage(role="user", content="Hi")]):
                print(r.delta, end="")

        ``achat``, ``acomplete``, ``astream_chat`` and ``astream_complete`` run the engine in a worker
        thread, so the event loop keeps running while Jamba generates.

    Per-call keyword arguments (chat and complete forms):
        ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop`` override the fields;
        ``documents`` (strings, ``{"text", "title", ...}`` dicts, LlamaIndex nodes or documents) go in
        Jamba's documents channel; ``citations=True`` turns on citation mode (cited document indices in
        ``message.additional_kwargs["citations"]``); ``response_format`` (OpenAI shape) constrains the
        output to JSON. ``CitableBlock`` and text ``DocumentBlock`` content in messages is read as
        documents too. Any other keyword raises ``TypeError`` (a misspelt ``max_tokens`` would otherwise
        pass unnoticed; LlamaIndex's own calls pass only these).

    Tool calling:
        .. code-block:: python

            response = llm.chat_with_tools([multiply_tool], user_msg="3 times 4?", tool_required=True)
            llm.get_tool_calls_from_response(response)  # [ToolSelection(tool_name="multiply", ...)]

        ``tool_required=True`` (or ``tool_choice="required"`` / a tool's name) forces a call by
        constrained decoding. Calls come back as ``ToolCallBlock``s in ``message.blocks`` and, OpenAI
        shaped, in ``message.additional_kwargs["tool_calls"]``; while streaming, partial calls appear as
        their arguments arrive.

    Structured output:
        ``structured_predict``, ``astructured_predict``, ``stream_structured_predict``,
        ``astream_structured_predict`` and ``as_structured_llm`` decode under the pydantic model's JSON
        schema (``pydantic_program_mode="default"``), so the output always parses unless it is cut off
        by ``max_new_tokens``.

    Reasoning models:
        A checkpoint whose chat template writes ``<think>`` (Jamba Reasoning 3B) thinks before it answers: the
        thinking comes as a ``ThinkingBlock`` first in ``message.blocks`` (``message.content`` is the answer
        alone; streamed, ``additional_kwargs["thinking_delta"]``), and a tool-call marker written while thinking
        is no call. Thinking blocks in the history are not sent back to the model.

    Token log-probabilities:
        With ``logprobs=True`` (a field or per-call keyword; ``top_logprobs`` 0-20 alternatives), the final
        response's ``logprobs`` holds one list per generated token: that token's ``LogProb`` first, then the
        other tokens among the ``top_logprobs`` most likely (so ``top_logprobs`` entries in all when the chosen
        token ranks among them, as greedy decoding's does, one more when it does not); natural logs under the
        model's own distribution, before a tool or JSON grammar and the sampling filters. They cover the raw output's tokens (``raw["text"]``,
        tool-call markup included); a stream gives them on its last response.

    Token usage and timings:
        ``response.raw["usage"]`` (``prompt_tokens``, ``completion_tokens``, ``total_tokens``,
        ``cached_tokens``) and ``response.raw["timings"]`` (time to first token, prefill and decode
        seconds and tokens/s); for a stream, on its last response.
    """

    model: str = Field(description="Checkpoint folder or Hub id (offline when cached); default $JAMBA_LOCAL_MODEL.")
    temperature: float = Field(default=0.0, ge=0.0, description="Sampling temperature; 0 is greedy.")
    max_new_tokens: int = Field(default=256, ge=1, alias="max_tokens",
                                description="Most tokens generated per call (LlamaIndex's num_output); max_tokens too.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 disables it.")
    top_k: int = Field(default=0, ge=0, description="Sample from the k most likely tokens; 0 disables it.")
    seed: Optional[int] = Field(default=None, description="Seed for reproducible sampling.")
    stop: Optional[List[str]] = Field(default=None, description="Strings that end generation (never echoed).")
    logprobs: Optional[bool] = Field(default=None, description="Return each generated token's log-probability (response.logprobs).")
    top_logprobs: Optional[int] = Field(default=0, ge=0, le=20,
                                        description="With logprobs, how many most likely tokens to list per token (None: 0).")
    dtype: str = Field(default="float32", description='Weight dtype: "float32" or "bfloat16".')
    device: str = Field(default="cpu", description='Torch device, e.g. "cpu" or "cuda".')
    quantization: Optional[str] = Field(default=None, description="Weight quantization on load (e.g. 'int8'), or None.")
    kv_cache_dtype: Optional[str] = Field(
        default=None, description='K/V cache dtype when it should differ from dtype (e.g. "bfloat16" with fp32 weights); None: dtype.')
    context_window: Optional[int] = Field(
        default=None, gt=0,
        description="Context window LlamaIndex should budget for; None: the checkpoint's max_position_embeddings.")

    model_config = ConfigDict(populate_by_name=True)  # max_new_tokens or its alias max_tokens

    _engine: Optional[Engine] = PrivateAttr(default=None)
    _checkpoint_window: Optional[int] = PrivateAttr(default=None)

    def __init__(self, model: Union[str, os.PathLike, Engine, None] = None, **kwargs: Any) -> None:
        engine = model if isinstance(model, Engine) else None
        if engine is not None:
            model = str(engine.path) if engine.path is not None else engine.model_name
        model = model or os.environ.get("JAMBA_LOCAL_MODEL")  # as ChatJamba
        if not model:
            raise ValueError("JambaLLM needs model= (a checkpoint folder, Hub id or Engine) or $JAMBA_LOCAL_MODEL")
        warn_unknown_options("JambaLLM", kwargs, type(self).model_fields, stacklevel=2)
        super().__init__(model=str(model), **kwargs)
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "JambaLLM"

    # -- the engine and what LlamaIndex budgets with ------------------------------------------------
    @property
    def engine(self) -> Engine:
        """The shared engine for this checkpoint and settings, loaded on first use."""
        if self._engine is None:
            self._engine = get_engine(self.model, dtype=self.dtype, device=self.device, quantization=self.quantization,
                                      kv_cache_dtype=self.kv_cache_dtype)
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window or self._read_checkpoint_window(),
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=True,
            model_name=self._model_name(),
        )

    def _read_checkpoint_window(self) -> int:
        # config.json only: LlamaIndex asks for metadata when it builds a query engine, long before
        # (and sometimes without) a generation, so this must not load the weights.
        if self._engine is not None:
            return self._engine.context_window
        if self._checkpoint_window is None:
            from jamba_core.config import load_config

            self._checkpoint_window = int(load_config(_config_file(self.model)).max_position_embeddings)
        return self._checkpoint_window

    def _model_name(self) -> str:
        path = Path(self.model).expanduser()
        return path.name if path.exists() else self.model

    def count_tokens(self, messages: Sequence[ChatMessage], **kwargs: Any) -> int:
        """Exact prompt tokens of a chat request (with ``tools``, ``documents``, ``response_format``)."""
        request, _ = self._request(messages, kwargs)
        return self.engine.count_tokens(request["messages"], tools=request["tools"], documents=request["documents"],
                                        response_format=request["response_format"], citations=request["citations"])

    # -- chat ------------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(messages, **kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._stream_chat(messages, **kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self._chat, messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return iterate_in_thread(lambda: self._stream_chat(messages, **kwargs))

    def _chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request, generation = self._request(messages, kwargs)
        return _chat_response(chat(self.engine, **request, **generation))

    def _stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        request, generation = self._request(messages, kwargs)
        content, calls = "", {}  # calls: stream index -> {"id", "name", "args"} (args: JSON text so far)
        for event in chat_stream(self.engine, **request, **generation):
            if isinstance(event, ContentDelta):
                content += event.text
                yield ChatResponse(message=_partial_message(content, calls), delta=event.text)
            elif isinstance(event, ToolCallChunk):
                call = calls.setdefault(event.index, {"id": event.id, "name": event.name, "args": ""})
                call["args"] += event.args_delta
                yield ChatResponse(message=_partial_message(content, calls), delta="")
            elif isinstance(event, InvalidToolCall):
                calls.pop(event.index, None)
            elif isinstance(event, ReasoningDelta):  # as LlamaIndex's Ollama LLM streams thinking
                yield ChatResponse(message=_partial_message(content, calls), delta="",
                                   additional_kwargs={"thinking_delta": event.text})
            elif isinstance(event, ChatDone):
                yield _chat_response(event.result, delta="")

    # -- completion: the prompt as one user turn, or as is when ``formatted`` ---------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Complete ``prompt``: sent as a user turn through the chat template, or, with
        ``formatted=True``, to the model as it is (raw text, no template)."""
        return self._complete(prompt, formatted, **kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._stream_complete(prompt, formatted, **kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self._complete, prompt, formatted, **kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return iterate_in_thread(lambda: self._stream_complete(prompt, formatted, **kwargs))

    def _complete(self, prompt: str, formatted: bool, **kwargs: Any) -> CompletionResponse:
        last = None
        for last in self._stream_complete(prompt, formatted, **kwargs):
            pass
        return CompletionResponse(text=last.text, raw=last.raw, additional_kwargs=last.additional_kwargs,
                                  logprobs=last.logprobs)

    def _stream_complete(self, prompt: str, formatted: bool, **kwargs: Any) -> CompletionResponseGen:
        if not formatted:
            for r in self._stream_chat([ChatMessage(role=MessageRole.USER, content=prompt)], **kwargs):
                yield CompletionResponse(text=r.message.content or "", delta=r.delta, raw=r.raw,
                                         additional_kwargs=dict(r.message.additional_kwargs), logprobs=r.logprobs)
            return
        _, generation = self._request([], kwargs)
        templated = sorted(k for k in _REQUEST_KEYS if kwargs.get(k) not in (None, False, [], "auto"))
        if templated:  # they go through the chat template, which formatted text bypasses
            raise TypeError(f"complete(formatted=True) sends the prompt as it is, so {templated} cannot apply "
                            "(they need the chat template); call without formatted=True")
        text, entries = "", []
        for chunk in self.engine.stream(prompt, **generation):
            text += chunk.text
            entries += chunk.logprobs or []
            last = chunk.finish_reason is not None
            raw = _raw(chunk.finish_reason, chunk.usage, chunk.timings, text) if last else None
            logprobs = _logprobs(entries) if last and "logprobs" in generation else None
            yield CompletionResponse(text=text, delta=chunk.text, raw=raw, logprobs=logprobs)

    # -- tools -----------------------------------------------------------------------------------
    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: Optional[Union[str, ChatMessage]] = None,
        chat_history: Optional[List[ChatMessage]] = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: Optional[Union[str, dict]] = None,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        """Messages and OpenAI-shaped tools for `chat`. ``tool_choice`` ("auto", "none", "required",
        a tool name or ``{"type": "function", "function": {"name": ...}}``) wins over ``tool_required``;
        ``tool_required`` means "required", or the one tool's name when there is a single tool and
        parallel calls are off (so exactly one call is decoded)."""
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str) else user_msg)
        specs = [tool.metadata.to_openai_tool(skip_length_check=True) for tool in tools]
        if tool_choice is None:
            tool_choice = "auto"
            if tool_required:
                tool_choice = specs[0]["function"]["name"] if len(specs) == 1 and not allow_parallel_tool_calls else "required"
        return {"messages": messages, "tools": specs or None, "tool_choice": _tool_choice_name(tool_choice) if specs else None,
                **kwargs}

    def _validate_chat_with_tools_response(self, response: ChatResponse, tools: Sequence[Any],
                                           allow_parallel_tool_calls: bool = False, **kwargs: Any) -> ChatResponse:
        if not allow_parallel_tool_calls:
            _keep_first_tool_call(response.message)
        return response

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> List[ToolSelection]:
        """The response's tool calls as `ToolSelection`s (partial ones, mid-stream, with the arguments
        parsed so far). Raises ``ValueError`` saying what the model did instead when there is none and
        ``error_on_no_tool_call``."""
        message = response.message
        selections = [ToolSelection(tool_id=b.tool_call_id or "", tool_name=b.tool_name, tool_kwargs=_kwargs_dict(b.tool_kwargs))
                      for b in message.blocks if isinstance(b, ToolCallBlock)]
        if not selections:  # a message built by hand may carry OpenAI-shaped calls only
            for call in message.additional_kwargs.get("tool_calls") or []:
                call = _openai_call(call)
                selections.append(ToolSelection(tool_id=call["id"] or "", tool_name=call["name"],
                                                tool_kwargs=_kwargs_dict(call["arguments"])))
        if not selections and error_on_no_tool_call:
            raise ValueError(_no_tool_call_message(message))
        return selections

    # -- structured output through constrained decoding ------------------------------------------------
    def structured_predict(self, output_cls: Type[BaseModel], prompt: PromptTemplate,
                           llm_kwargs: Optional[Dict[str, Any]] = None, **prompt_args: Any) -> BaseModel:
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return super().structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        dispatcher.event(LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt, template_args=prompt_args))
        messages = self._extend_messages(prompt.format_messages(llm=self, **prompt_args))
        response = self.chat(messages, response_format=_json_schema_format(output_cls), **(llm_kwargs or {}))
        result = _validate_structured(output_cls, response)
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    async def astructured_predict(self, output_cls: Type[BaseModel], prompt: PromptTemplate,
                                  llm_kwargs: Optional[Dict[str, Any]] = None, **prompt_args: Any) -> BaseModel:
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super().astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        dispatcher.event(LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt, template_args=prompt_args))
        messages = self._extend_messages(prompt.format_messages(llm=self, **prompt_args))
        response = await self.achat(messages, response_format=_json_schema_format(output_cls), **(llm_kwargs or {}))
        result = _validate_structured(output_cls, response)
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    def stream_structured_predict(self, output_cls: Type[BaseModel], prompt: PromptTemplate,
                                  llm_kwargs: Optional[Dict[str, Any]] = None, **prompt_args: Any):
        """Partial objects (fields filled as their JSON arrives), then the validated object."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            yield from super().stream_structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
            return
        dispatcher.event(LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt, template_args=prompt_args))
        messages = self._extend_messages(prompt.format_messages(llm=self, **prompt_args))
        stream = self.stream_chat(messages, response_format=_json_schema_format(output_cls), **(llm_kwargs or {}))
        partial, last = None, None
        for last in stream:
            if last.delta:
                partial = process_streaming_objects(last, output_cls, cur_objects=None if partial is None else [partial])
                dispatcher.event(LLMStructuredPredictInProgressEvent(output=partial))
                yield partial
        result = _validate_structured(output_cls, last)
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        yield result

    async def astream_structured_predict(self, output_cls: Type[BaseModel], prompt: PromptTemplate,
                                         llm_kwargs: Optional[Dict[str, Any]] = None, **prompt_args: Any):
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super().astream_structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)

        async def gen():
            dispatcher.event(LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt, template_args=prompt_args))
            messages = self._extend_messages(prompt.format_messages(llm=self, **prompt_args))
            stream = await self.astream_chat(messages, response_format=_json_schema_format(output_cls), **(llm_kwargs or {}))
            partial, last = None, None
            async for last in stream:
                if last.delta:
                    partial = process_streaming_objects(last, output_cls, cur_objects=None if partial is None else [partial])
                    dispatcher.event(LLMStructuredPredictInProgressEvent(output=partial))
                    yield partial
            result = _validate_structured(output_cls, last)
            dispatcher.event(LLMStructuredPredictEndEvent(output=result))
            yield result

        return gen()

    # -- prefix-state reuse ----------------------------------------------------------------------
    def pin(self, documents: Optional[Sequence[Any]] = None, messages: Optional[Sequence[ChatMessage]] = None,
            tools: Optional[Sequence[Any]] = None, citations: bool = False) -> tuple:
        """Prefill documents (and the conversation before the question) once and keep their state:
        every later call with the same documents, messages and tools prefills only the question.
        Returns a handle for `release`. Reuse shows in ``raw["usage"]["cached_tokens"]``."""
        request, _ = self._request(list(messages or []), {"documents": documents, "tools": tools, "citations": citations})
        return self.engine.pin(request["messages"], tools=request["tools"], documents=request["documents"], citations=citations)

    def release(self, handle: tuple) -> None:
        """Unpin a prefix from `pin` (it stays cached until evicted)."""
        self.engine.release(handle)

    # -- requests --------------------------------------------------------------------------------
    def _request(self, messages: Sequence[ChatMessage], kwargs: Dict[str, Any]) -> tuple[dict, dict]:
        """(chat request: messages, tools, tool_choice, documents, citations, response_format;
        generation settings), the fields overridden by any per-call keyword."""
        unknown = sorted(set(kwargs) - {*_GENERATION_KEYS, *_REQUEST_KEYS, *_LOGPROB_KEYS, "max_tokens"})
        if unknown:
            raise TypeError(f"JambaLLM got unexpected keyword arguments {unknown}; per-call keywords are "
                            f"{sorted({*_GENERATION_KEYS, *_REQUEST_KEYS, *_LOGPROB_KEYS, 'max_tokens'})}")
        generation = {key: kwargs.get(key, getattr(self, key)) for key in _GENERATION_KEYS}
        if kwargs.get("logprobs", self.logprobs):
            top = kwargs.get("top_logprobs", self.top_logprobs)
            generation["logprobs"] = 0 if top is None else top  # the engine checks 0..20
        if "max_tokens" in kwargs and "max_new_tokens" not in kwargs:  # the OpenAI name
            generation["max_new_tokens"] = kwargs["max_tokens"]
        documents = [to_document(d) for d in kwargs.get("documents") or []]
        request = {
            "messages": [to_jamba_message(m, documents) for m in messages],
            "tools": [_openai_tool(t) for t in kwargs.get("tools") or []] or None,
            "tool_choice": _tool_choice_name(kwargs.get("tool_choice") or "auto"),
            "documents": documents or None,
            "citations": bool(kwargs.get("citations", False)),
            "response_format": kwargs.get("response_format"),
        }
        return request, generation


# -- LlamaIndex messages -> jamba_core dicts ------------------------------------------------------


def to_jamba_message(message: ChatMessage, documents: List[dict]) -> dict:
    """One `ChatMessage` as the OpenAI-shaped dict `jamba_core.chat` reads. Citable and text document
    blocks are appended to ``documents`` (Jamba's documents channel) instead of the text."""
    role = _ROLES.get(message.role.value)
    if role is None:
        raise ValueError(f"JambaLLM cannot send a message with role {message.role.value!r}")
    texts, calls = [], []
    for block in message.blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolCallBlock):
            calls.append({"id": block.tool_call_id, "type": "function",
                          "function": {"name": block.tool_name, "arguments": block.tool_kwargs}})
        elif isinstance(block, CitableBlock):
            documents.append({"title": block.title, "source": block.source,
                              "text": "\n".join(b.text for b in block.content if isinstance(b, TextBlock))})
        elif isinstance(block, DocumentBlock) and (block.document_mimetype or "").startswith("text/"):
            documents.append({"title": block.title, "text": block.resolve_document().read().decode("utf-8")})
        elif isinstance(block, ThinkingBlock) or type(block).__name__ == "CachePoint":
            continue
        else:
            raise ValueError(f"JambaLLM reads text only: {'an' if role[:1] in 'aeio' else 'a'} {role} message holds a {type(block).__name__}; "
                             "send text, tool calls, or text documents (CitableBlock, documents=)")
    out: Dict[str, Any] = {"role": role, "content": "\n".join(texts)}
    extra = message.additional_kwargs
    if role == "assistant":
        calls = calls or [_openai_call(c) for c in extra.get("tool_calls") or []]
        if calls:
            out["tool_calls"] = calls
    if role == "tool" and extra.get("tool_call_id") is not None:
        out["tool_call_id"] = extra["tool_call_id"]
    if extra.get("name") is not None and role in ("user", "tool"):
        out["name"] = extra["name"]
    return out


def to_document(doc: Any) -> dict:
    """A document for Jamba's documents channel: ``{"text", "title"?, ...}`` from a string, a dict, a
    LlamaIndex node / document or a `NodeWithScore`."""
    if isinstance(doc, NodeWithScore):
        doc = doc.node
    if isinstance(doc, str):
        return {"text": doc}
    if isinstance(doc, BaseNode):
        meta = doc.metadata or {}
        title = meta.get("title") or meta.get("file_name") or meta.get("document_title")
        out = {"text": doc.get_content(metadata_mode=MetadataMode.NONE)}
        return {"title": str(title), **out} if title else out
    if isinstance(doc, dict) and isinstance(doc.get("text"), str):
        return dict(doc)
    raise ValueError(f"a document must be a string, a dict with 'text', or a LlamaIndex node; got {type(doc).__name__}")


def _openai_call(call: Any) -> dict:
    """``{"id", "name", "arguments"}`` from an OpenAI-shaped call (a dict or an SDK object)."""
    if hasattr(call, "model_dump"):
        call = call.model_dump()
    if not isinstance(call, dict):
        raise ValueError(f"cannot read tool call {call!r}")
    function = call.get("function") or call
    return {"id": call.get("id"), "name": function.get("name"),
            "arguments": function.get("arguments", function.get("args", {}))}


def _openai_tool(tool: Any) -> dict:
    """An OpenAI function tool from a LlamaIndex tool (or an OpenAI-shaped dict, as it is)."""
    metadata = getattr(tool, "metadata", None)
    return metadata.to_openai_tool(skip_length_check=True) if hasattr(metadata, "to_openai_tool") else tool


def _tool_choice_name(choice: Any) -> Any:
    if isinstance(choice, dict):
        return (choice.get("function") or choice).get("name")
    return choice


# -- jamba_core results -> LlamaIndex responses ----------------------------------------------------


def _raw(finish_reason: str, usage, timings, text: str, citations: Sequence[int] = ()) -> dict:
    return {
        "finish_reason": finish_reason,
        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "total_tokens": usage.total_tokens, "cached_tokens": usage.cached_tokens},
        "timings": asdict(timings),
        "text": text,
        "citations": list(citations),
    }


def _chat_response(result: ChatResult, delta: Optional[str] = None) -> ChatResponse:
    blocks: List[Any] = [ThinkingBlock(content=result.reasoning)] if result.reasoning else []
    blocks += [TextBlock(text=result.content)]
    blocks += [ToolCallBlock(tool_call_id=c["id"], tool_name=c["name"], tool_kwargs=c["args"]) for c in result.tool_calls]
    extra: Dict[str, Any] = {}
    if result.tool_calls:
        extra["tool_calls"] = [{"id": c["id"], "type": "function",
                                "function": {"name": c["name"], "arguments": json.dumps(c["args"], ensure_ascii=False)}}
                               for c in result.tool_calls]
    if result.invalid_tool_calls:
        extra["invalid_tool_calls"] = list(result.invalid_tool_calls)
    if result.citations:
        extra["citations"] = list(result.citations)
    message = ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=extra)
    raw = _raw(result.finish_reason, result.usage, result.timings, result.text, result.citations)
    return ChatResponse(message=message, delta=delta, raw=raw,
                        logprobs=None if result.logprobs is None else _logprobs(result.logprobs))


def _logprobs(entries: Sequence[Any]) -> List[List[LogProb]]:
    """`jamba_core.engine.TokenLogprob`s -> LlamaIndex's per-token lists: the generated token, then its
    alternatives (the chosen one not repeated)."""
    def one(e: Any) -> LogProb:
        return LogProb(token=e.token, logprob=e.logprob, bytes=list(e.bytes))

    return [[one(e), *(one(t) for t in e.top_logprobs if t.token_id != e.token_id)] for e in entries]


def _partial_message(content: str, calls: Dict[int, dict]) -> ChatMessage:
    """The assistant message so far: its text, and each call with the arguments' JSON text so far."""
    blocks: List[Any] = [TextBlock(text=content)]
    blocks += [ToolCallBlock(tool_call_id=c["id"], tool_name=c["name"] or "", tool_kwargs=c["args"]) for c in calls.values()]
    extra = {}
    if calls:
        extra["tool_calls"] = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["args"]}}
                               for c in calls.values()]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks, additional_kwargs=extra)


def _keep_first_tool_call(message: ChatMessage) -> None:
    seen = False
    kept = []
    for block in message.blocks:
        if isinstance(block, ToolCallBlock):
            if seen:
                continue
            seen = True
        kept.append(block)
    message.blocks = kept
    if message.additional_kwargs.get("tool_calls"):
        message.additional_kwargs["tool_calls"] = message.additional_kwargs["tool_calls"][:1]


def _kwargs_dict(args: Any) -> dict:
    if isinstance(args, dict):
        return args
    if not args:
        return {}
    try:
        parsed = parse_partial_json(args)
    except (ValueError, TypeError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _no_tool_call_message(message: ChatMessage) -> str:
    invalid = message.additional_kwargs.get("invalid_tool_calls") or []
    if invalid:
        reasons = "; ".join(f"{c.get('name') or '?'}: {c.get('error')} (raw: {c.get('args')!r})" for c in invalid)
        return f"JambaLLM tried to call a tool but no call could be used: {reasons}"
    text = (message.content or "").strip()
    shown = text if len(text) <= 300 else text[:300] + "..."
    return (f"JambaLLM answered in text instead of calling a tool: {shown!r}. Pass tool_required=True (or "
            "tool_choice='<tool name>') to force a call, or error_on_no_tool_call=False to accept a text answer.")


def _json_schema_format(output_cls: Type[BaseModel]) -> dict:
    return {"type": "json_schema",
            "json_schema": {"name": output_cls.__name__, "schema": output_cls.model_json_schema(), "strict": True}}


def _validate_structured(output_cls: Type[BaseModel], response: Optional[ChatResponse]) -> BaseModel:
    text = (response.message.content or "") if response is not None else ""
    try:
        return output_cls.model_validate_json(text)
    except ValueError as err:
        raw = (response.raw or {}) if response is not None else {}
        hint = ""
        if raw.get("finish_reason") == "length":
            hint = (f" The JSON was cut off after {raw['usage']['completion_tokens']} tokens (max_new_tokens): "
                    "raise max_new_tokens.")
        raise ValueError(f"JambaLLM's output is not a valid {output_cls.__name__}:{hint} Output: {text[:300]!r}. "
                         f"Error: {err}") from err


# -- helpers ---------------------------------------------------------------------------------------


def _config_file(model: str) -> Path:
    """``config.json`` of a checkpoint folder, or of a Hub id (that one file, from the cache if offline)."""
    from jamba_core.loading import could_be_hub_id, resolve_checkpoint

    path = Path(model).expanduser()
    if path.exists():
        return path
    if not could_be_hub_id(model):
        resolve_checkpoint(model)  # raises the engine's FileNotFoundError for a missing folder
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model, "config.json"))
    except Exception as err:  # offline, unknown repo: say what to do
        why = " ".join(str(err).split())
        raise FileNotFoundError(f"{model!r} is no local folder (nothing at {path.resolve()}) and the Hub's config.json of it "
                                f"could not be read ({type(err).__name__}: {why}). Check the path, or download it first.") from err
