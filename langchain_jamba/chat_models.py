"""ChatJamba: a LangChain chat model that runs a Jamba checkpoint in this process.

The model logic (chat template, tool-call grammar and parsing, generation) lives in `jamba_core`; this
module only translates LangChain messages to the OpenAI-shaped dicts `jamba_core.chat.api` reads, and its
results back to `AIMessage` / `AIMessageChunk`.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableGenerator, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils import from_env
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.json import parse_json_markdown, parse_partial_json
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator
from typing_extensions import Self

from jamba_core.aio import iterate_in_thread

PROVIDER = "jamba-local"
_CHOICE_WORDS = ("auto", "none", "any", "required")
_MEDIA_BLOCKS = ("image", "image_url", "audio", "input_audio", "video", "file")
_TEXT_BLOCKS = ("text", "input_text", "output_text")
# per-call arguments (besides `model` and `stop`): chat_stream's options, then the sampling settings
_CALL_OPTIONS = ("tools", "tool_choice", "documents", "response_format", "citations", "parallel_tool_calls")
_SAMPLING_OPTIONS = ("temperature", "max_tokens", "top_p", "top_k", "seed", "logprobs", "top_logprobs")


class ChatJamba(BaseChatModel):
    """A Jamba model (AI21's hybrid Transformer-Mamba-MoE) as a LangChain chat model, run in this process.

    The checkpoint loads on first use, not when the object is built, and is shared by every
    `ChatJamba` (and LlamaIndex `JambaLLM`) that names the same checkpoint and settings.

    Setup:
        Install the package with its LangChain extra; a checkpoint is a local folder (config.json,
        safetensors, tokenizer) or a Hugging Face Hub id, downloaded once by `huggingface_hub`.

        ```bash
        pip install "jamba-local[langchain]"
        export JAMBA_LOCAL_MODEL=ai21labs/AI21-Jamba-Mini-1.7   # optional: the default `model`
        ```

        To try everything on a laptop first, make a small random-weight checkpoint (its answers are
        noise, but every call below runs):

        ```python
        from jamba_core.testing import make_checkpoint

        path = make_checkpoint("/tmp/jamba-tiny", preset="tiny")
        ```

    Key init args — completion params:
        model: str
            Checkpoint folder or Hub id (also read from `JAMBA_LOCAL_MODEL`); an already loaded
            `jamba_core.Engine` is accepted too.
        temperature: float
            0 (the default) is greedy decoding.
        max_tokens: int | None
            Most new tokens per call (default 256); None: up to the end of the context window.
        top_p: float, top_k: int, seed: int | None
            Nucleus and top-k filters (1.0 and 0 disable them); a seed makes sampling repeatable.
        stop: list[str] | None
            Strings that end generation (never included in the output).
        citations: bool
            Ask the model to cite the documents it used (Jamba's citation mode).
        parallel_tool_calls: bool
            With a forced tool choice ("any"/"required"), allow several calls in one answer (default
            True); False makes it exactly one. Also a `bind_tools` / call argument.
        logprobs: bool | None, top_logprobs: int | None
            Return each generated token's log-probability in ``response_metadata["logprobs"]`` (as
            ChatOpenAI does), with the ``top_logprobs`` (0-20) most likely alternatives; also call arguments.

    Key init args — client params:
        dtype: str
            "float32" (default) or "bfloat16" weights; the Mamba state is always fp32.
        device: str
            "cpu" (default) or "cuda".
        quantization: str | None
            Weight quantization applied on load (e.g. "int8"), None for none.

    See the full list of fields on the class.

    Instantiate:
        ```python
        from langchain_jamba import ChatJamba

        llm = ChatJamba(
            model="ai21labs/AI21-Jamba-Mini-1.7",
            temperature=0,
            max_tokens=256,
            # dtype="bfloat16", device="cuda", seed=0, stop=["\\n\\n"], ...
        )
        ```

    Invoke:
        ```python
        messages = [
            ("system", "You are a helpful translator. Translate the user sentence to French."),
            ("human", "I love programming."),
        ]
        msg = llm.invoke(messages)
        print(msg.content)
        ```

        ```python
        "J'adore la programmation."
        ```

        Documents go with the call; with `citations=True` the ids of the documents the answer used
        come back in `response_metadata["citations"]`:

        ```python
        from langchain_core.documents import Document

        docs = [Document(page_content="The Pequod sails from Nantucket.", metadata={"title": "Ch. 16"})]
        msg = llm.invoke("Where does the Pequod sail from?", documents=docs, citations=True)
        print(msg.content, msg.response_metadata["citations"])
        ```

        ```python
        "From Nantucket." [0]
        ```

    Stream:
        ```python
        for chunk in llm.stream(messages):
            print(chunk.text, end="")
        ```

        ```python
        J'adore la programmation.
        ```

        ```python
        stream = llm.stream(messages)
        full = next(stream)
        for chunk in stream:
            full += chunk
        print(full.usage_metadata, full.response_metadata["finish_reason"])
        ```

        ```python
        {'input_tokens': 37, 'output_tokens': 8, 'total_tokens': 45, 'input_token_details': {'cache_read': 0}} stop
        ```

    Async:
        Generation runs in a worker thread: the event loop stays free while the model computes.

        ```python
        import asyncio

        async def main():
            print((await llm.ainvoke(messages)).content)
            async for chunk in llm.astream(messages):
                print(chunk.text, end="")
            print(len(await llm.abatch([messages, messages])))

        asyncio.run(main())
        ```

        ```python
        J'adore la programmation.
        J'adore la programmation.
        2
        ```

    Tool calling:
        ```python
        from pydantic import BaseModel, Field

        class GetWeather(BaseModel):
            '''Get the current weather in a given location'''

            location: str = Field(..., description="The city and state, e.g. San Francisco, CA")

        class GetPopulation(BaseModel):
            '''Get the current population in a given location'''

            location: str = Field(..., description="The city and state, e.g. San Francisco, CA")

        llm_with_tools = llm.bind_tools([GetWeather, GetPopulation])
        ai_msg = llm_with_tools.invoke("Which city is bigger, LA or NY?")
        print(ai_msg.tool_calls)
        ```

        ```python
        [{'name': 'GetPopulation', 'args': {'location': 'Los Angeles, CA'}, 'id': 'call_...', 'type': 'tool_call'},
         {'name': 'GetPopulation', 'args': {'location': 'New York, NY'}, 'id': 'call_...', 'type': 'tool_call'}]
        ```

        `tool_choice` is enforced by constrained decoding: "auto" (the default), "none", "any" or
        "required" (some tool must be called), or a tool's name (that tool must be called):

        ```python
        forced = llm.bind_tools([GetWeather, GetPopulation], tool_choice="GetWeather")
        print(forced.invoke("Hello!").tool_calls[0]["name"])
        ```

        ```python
        GetWeather
        ```

    Structured output:
        ```python
        from typing import Optional

        class Joke(BaseModel):
            '''Joke to tell user.'''

            setup: str = Field(description="The setup of the joke")
            punchline: str = Field(description="The punchline to the joke")
            rating: Optional[int] = Field(default=None, description="How funny the joke is, from 1 to 10")

        structured_llm = llm.with_structured_output(Joke)
        print(structured_llm.invoke("Tell me a joke about cats"))
        ```

        ```python
        Joke(setup='Why was the cat sitting on the computer?', punchline='To keep an eye on the mouse!', rating=None)
        ```

        `method="function_calling"` (the default) forces a call to a tool made from the schema;
        `method="json_schema"` constrains the answer to JSON that validates against it. Either way the
        output parses: as `max_tokens` runs out the grammar closes it in the tokens left (a string value
        that does not fit is shortened, one that fits is kept). Only a budget under the structure's own
        length cuts it off: then invoking (or streaming) raises `OutputParserException` saying so (raise
        `max_tokens`). `include_raw=True` returns the raw message and any parsing error instead of raising.

        Tools and a `response_format` bound together with `tool_choice="auto"` (LangChain's
        `create_agent(..., response_format=...)` binds both) constrain the answer to a tool call or the
        JSON: the model chooses.

    JSON mode:
        ```python
        json_llm = llm.bind(response_format={"type": "json_object"})
        ai_msg = json_llm.invoke("Return a JSON object with key 'random_ints' and a value of 3 random ints in [0-99]")
        print(ai_msg.content)
        ```

        ```python
        '{"random_ints": [23, 87, 45]}'
        ```

    Token usage:
        ```python
        from langchain_core.messages import HumanMessage, SystemMessage

        ai_msg = llm.invoke(messages)
        print(ai_msg.usage_metadata)
        print(llm.get_num_tokens_from_messages([SystemMessage(messages[0][1]), HumanMessage(messages[1][1])]))
        ```

        ```python
        {'input_tokens': 37, 'output_tokens': 8, 'total_tokens': 45, 'input_token_details': {'cache_read': 0}}
        37
        ```

        Counts are exact: they go through the checkpoint's own tokenizer and chat template.
        `input_token_details["cache_read"]` counts the prompt tokens whose state the engine reused from an
        earlier call with the same beginning (a shared system prompt, the turns of a conversation).

    Reasoning models:
        A checkpoint whose chat template writes ``<think>`` (Jamba Reasoning 3B) thinks before it answers. The
        thinking goes to ``additional_kwargs["reasoning_content"]`` (streamed in chunks that merge to it, as
        ChatDeepSeek and ChatOllama send it), not to ``content``, and a tool-call marker written while thinking
        is no call. A forced tool choice or a structured output answers at once, without thinking.

    Response metadata:
        ```python
        print(ai_msg.response_metadata)
        ```

        ```python
        {'model_name': 'ai21labs/AI21-Jamba-Mini-1.7', 'model_provider': 'jamba-local', 'finish_reason': 'stop',
         'time_to_first_token': 0.41, 'prefill_tokens_per_s': 90.2, 'decode_tokens_per_s': 21.7, 'citations': [],
         'invalid_tool_calls': []}
        ```

        With ``logprobs=True`` it also holds ``"logprobs": {"content": [{"token", "bytes", "logprob",
        "top_logprobs": [...]}, ...]}``, one entry per generated token in OpenAI's layout: natural-log
        probabilities under the model's own distribution (before a tool or JSON grammar and the sampling
        filters), the raw output's tokens (tool-call markup included). A stream sends them with its
        last chunk.

        ``invalid_tool_calls`` there holds each unusable call as written, with its error. A stream's
        merged message needs it: LangChain rebuilds ``invalid_tool_calls`` from the chunks, without the
        error, and the chunks end an invalid call's arguments with a bracket that keeps LangChain from
        repairing it into a callable one.
    """

    model: str | None = Field(default_factory=from_env("JAMBA_LOCAL_MODEL", default=None), alias="model_name")
    """Checkpoint folder or Hugging Face Hub id (default: the `JAMBA_LOCAL_MODEL` environment variable)."""

    temperature: float = 0.0
    """Sampling temperature; 0 is greedy decoding."""

    max_tokens: int | None = Field(default=256, alias="max_new_tokens")
    """Most tokens to generate per call; None: until the context window is full (``max_new_tokens``, the
    name `JambaLLM` and transformers use, is taken too)."""

    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1 disables)."""

    top_k: int = 0
    """Keep only the `top_k` most likely tokens when sampling (0 disables)."""

    seed: int | None = None
    """Seed of the sampler, for repeatable sampled output."""

    stop: list[str] | None = None
    """Strings that end generation; the stop string is not part of the output. They end free text only:
    a forced tool call or a JSON answer is not cut (its own text may hold one, such as a newline)."""

    citations: bool = False
    """Turn on Jamba's citation mode: the answer cites the documents it used (see `response_metadata`)."""

    parallel_tool_calls: bool = True
    """With a forced tool choice, allow several calls in one answer (False: exactly one call)."""

    logprobs: bool | None = None
    """Return the generated tokens' log-probabilities in ``response_metadata["logprobs"]``."""

    top_logprobs: int | None = None
    """With `logprobs`, how many most likely alternatives (0-20) to list for each token."""

    dtype: str = "float32"
    """Weight dtype: "float32" or "bfloat16"."""

    device: str = "cpu"
    """Device to run on: "cpu" or "cuda"."""

    quantization: str | None = None
    """Weight quantization applied when the checkpoint loads (None: none)."""

    kv_cache_dtype: str | None = None
    """K/V cache dtype when it should differ from ``dtype`` ("bfloat16" with fp32 weights: half the cache
    memory, faster long-prompt attention); None: ``dtype``."""

    streaming: bool = False
    """Generate through the streaming path even on `invoke` (callbacks then see each token)."""

    model_config = ConfigDict(populate_by_name=True)

    _engine: Any = PrivateAttr(default=None)

    def __init__(self, **kwargs: Any) -> None:
        engine = None
        for key in ("model", "model_name"):
            if _is_engine(kwargs.get(key)):
                engine = kwargs[key]
                kwargs[key] = str(engine.path) if getattr(engine, "path", None) is not None else engine.model_name
        super().__init__(**kwargs)
        self._engine = engine

    def __getstate__(self) -> dict[Any, Any]:
        """Pickled without the engine (torch modules do not pickle); it is loaded again, or taken from
        the process's shared engines, on first use."""
        state = super().__getstate__()
        return {**state, "__pydantic_private__": {**(state.get("__pydantic_private__") or {}), "_engine": None}}

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Self:
        """A deep copy shares the engine (weights and caches are not copied)."""
        engine, self._engine = self._engine, None
        try:
            copied = super().__deepcopy__(memo)
        finally:
            self._engine = engine
        copied._engine = engine
        return copied

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown(cls, values: Any) -> Any:
        if isinstance(values, dict):  # LangChain's standard timeout / max_retries / api_key mean nothing here
            from jamba_core.engine import warn_unknown_options

            warn_unknown_options("ChatJamba", values, cls.model_fields, accepted=("timeout", "max_retries", "api_key"),
                                 stacklevel=5)  # through pydantic's and LangChain's __init__ to the caller
        return values

    @field_validator("model", mode="before")
    @classmethod
    def _model_as_text(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @model_validator(mode="after")
    def _require_model(self) -> Self:
        if not self.model:
            raise ValueError("ChatJamba needs a checkpoint: pass model=<folder or Hub id> or set JAMBA_LOCAL_MODEL")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (or None), got {self.max_tokens}")
        from jamba_core.engine import check_sampling

        check_sampling(self.max_tokens or 1, self.temperature, self.top_p, self.top_k, self.seed)
        _engine_logprobs(self.logprobs, self.top_logprobs)
        return self

    # -- LangChain's descriptive hooks ------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return PROVIDER

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "citations": self.citations,
            "parallel_tool_calls": self.parallel_tool_calls,
            "logprobs": self.logprobs,
            "top_logprobs": self.top_logprobs,
            "dtype": self.dtype,
            "device": self.device,
            "quantization": self.quantization,
            "kv_cache_dtype": self.kv_cache_dtype,
        }

    def _get_invocation_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        """LangChain's params (its cache key among them) with the stop strings the call will use: the
        call's, else this model's (LangChain writes the call's alone, None when it gives none)."""
        return super()._get_invocation_params(stop=stop if stop is not None else self.stop, **kwargs)

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        params: dict[str, Any] = {
            "ls_provider": PROVIDER,
            "ls_model_name": kwargs.get("model") or self.model,
            "ls_model_type": "chat",
            "ls_temperature": kwargs.get("temperature", self.temperature),
        }
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop := stop if stop is not None else self.stop:
            params["ls_stop"] = stop
        return params

    def _resolve_model_profile(self) -> ModelProfile | None:
        profile = ModelProfile(
            open_weights=True,
            text_inputs=True,
            image_inputs=False,
            audio_inputs=False,
            video_inputs=False,
            pdf_inputs=False,
            text_outputs=True,
            tool_calling=True,
            tool_choice=True,
            tool_call_streaming=True,
            structured_output=True,
            mid_conversation_system_messages=False,  # the template merges system messages into the first
            temperature=True,
        )
        window = _context_window_without_loading(self.model)
        if window:
            profile["max_input_tokens"] = window
        return profile

    # -- the engine ---------------------------------------------------------------------------------
    @property
    def engine(self):
        """The `jamba_core.Engine` behind this model (loaded on first use, shared in the process)."""
        return self._get_engine()

    def _get_engine(self, model: str | None = None):
        """The shared engine for `model` (a per-call override) or this instance's checkpoint; loads it
        on first use."""
        if model is None or model == self.model:
            if self._engine is None:
                from jamba_core.engine import get_engine

                self._engine = get_engine(self.model, dtype=self.dtype, device=self.device, quantization=self.quantization,
                                          kv_cache_dtype=self.kv_cache_dtype)
                if isinstance(self.profile, dict) and "max_input_tokens" not in self.profile:
                    self.profile["max_input_tokens"] = self._engine.context_window
            return self._engine
        from jamba_core.engine import get_engine

        return get_engine(model, dtype=self.dtype, device=self.device, quantization=self.quantization,
                          kv_cache_dtype=self.kv_cache_dtype)

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> _Request:
        """A call's messages and arguments in `jamba_core.chat`'s terms; the engine is not touched.

        Raises TypeError for an argument ChatJamba does not know, ValueError for content it cannot send."""
        kwargs = dict(kwargs)
        override = kwargs.pop("model", None)
        unknown = sorted(set(kwargs) - set(_CALL_OPTIONS) - set(_SAMPLING_OPTIONS))
        if unknown:
            raise TypeError(f"ChatJamba got unexpected call arguments {unknown}")
        stop = self.stop if stop is None else stop
        tools = [_openai_tool(t) for t in kwargs.get("tools") or ()]  # as is when bound by bind_tools
        choice = _normalize_tool_choice(kwargs.get("tool_choice"), [t["function"]["name"] for t in tools])
        params: dict[str, Any] = {
            "temperature": kwargs.get("temperature", self.temperature),
            "top_p": kwargs.get("top_p", self.top_p),
            "top_k": kwargs.get("top_k", self.top_k),
            "seed": kwargs.get("seed", self.seed),
            # a call's logprobs=False turns them off whatever this model's top_logprobs say
            "logprobs": _engine_logprobs(kwargs.get("logprobs", self.logprobs),
                                         kwargs.get("top_logprobs", self.top_logprobs if kwargs.get("logprobs", True) else None)),
            "stop": [stop] if isinstance(stop, str) else list(stop) if stop else None,  # "fox" is one stop string
            "citations": kwargs.get("citations", self.citations),
            "parallel_tool_calls": kwargs.get("parallel_tool_calls", self.parallel_tool_calls),
            "tools": tools or None,
            "tool_choice": choice or "auto",
            "response_format": _normalize_response_format(kwargs.get("response_format")),
            "documents": _convert_documents(kwargs.get("documents")),
        }
        return _Request(override, override or self.model, _convert_messages(messages), params,
                        kwargs.get("max_tokens", self.max_tokens))

    def _events(self, request: _Request) -> Iterator[Any]:
        """Load the engine (first use) and run the request: `jamba_core.chat.api.chat_stream`'s events."""
        from jamba_core.chat.api import chat_stream

        engine = self._get_engine(request.override)
        max_tokens = request.max_tokens
        if max_tokens is None:  # the rest of the context window
            used = engine.count_tokens(request.messages, **{k: request.params[k] for k in _CALL_OPTIONS if k not in ("tool_choice", "parallel_tool_calls")})
            if used >= engine.context_window:
                raise ValueError(f"the prompt takes {used} tokens, and the model's context window is {engine.context_window}: "
                                 "no room is left for an answer (max_tokens=None answers in the rest of the window); "
                                 "shorten the prompt")
            max_tokens = engine.context_window - used
        return chat_stream(engine, request.messages, max_new_tokens=max_tokens, **request.params)

    def _chunks(self, request: _Request) -> Iterator[AIMessageChunk]:
        events = self._events(request)
        try:
            state = _StreamState()
            for event in events:
                if (chunk := _to_chunk(event, request.model_name, state)) is not None:
                    yield chunk
        finally:
            events.close()  # ends generation early (and frees the engine) when the reader stops

    # -- generation ---------------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        return _chat_result(_last_result(self._events(request)), request.model_name)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for chunk in self._chunks(self._request(messages, stop, kwargs)):
            yield ChatGenerationChunk(message=chunk)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        from jamba_core.chat.api import ChatDone

        request = self._request(messages, stop, kwargs)
        result = None
        # every event crosses to the loop (not only the last), so a cancelled call stops at the next token
        async for event in iterate_in_thread(lambda: self._events(request)):
            if isinstance(event, ChatDone):
                result = event.result
        return _chat_result(result, request.model_name)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        async for chunk in iterate_in_thread(lambda: self._chunks(request)):
            yield ChatGenerationChunk(message=chunk)

    # -- prefix-state reuse --------------------------------------------------------------------------
    def pin(self, documents: Sequence[Any] | None = None, messages: Sequence[BaseMessage] | None = None,
            tools: Sequence[Any] | None = None) -> tuple:
        """Prefill documents (and the conversation before the question, and tools) once and keep their
        state: every later call with the same documents, messages and tools prefills only the question.
        Reuse shows in `usage_metadata["input_token_details"]["cache_read"]`. Returns a handle for
        `release`. (Multi-turn chats reuse earlier turns without pinning: the engine snapshots every
        message boundary.)"""
        formatted = [_openai_tool(t) for t in tools] if tools else None
        return self._get_engine().pin(_convert_messages(list(messages or [])), tools=formatted,
                                      documents=_convert_documents(documents), citations=self.citations)

    def release(self, handle: tuple) -> None:
        """Unpin a prefix from `pin` (it stays cached until evicted)."""
        self._get_engine().release(handle)

    # -- tokens ---------------------------------------------------------------------------------------
    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` as the checkpoint's tokenizer reads a plain-text prompt (BOS included)."""
        return self._get_engine().encode(text)

    def get_num_tokens(self, text: str) -> int:
        """Exact token count of `text` as a plain-text prompt (BOS included), with the checkpoint's tokenizer."""
        return self._get_engine().count_tokens(text)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None,
                                     documents: Sequence[Any] | None = None) -> int:
        """Exact prompt tokens of a call: the messages (with `tools` and `documents`) rendered through the
        checkpoint's chat template, generation prompt included. Equals `usage_metadata["input_tokens"]`
        of the same call."""
        formatted = [_openai_tool(t) for t in tools] if tools else None
        return self._get_engine().count_tokens(_convert_messages(messages), tools=formatted,
                                               documents=_convert_documents(documents))

    # -- tools and structured output ----------------------------------------------------------------
    def bind_tools(self, tools: Sequence[dict[str, Any] | type | Callable | BaseTool], *,
                   tool_choice: dict | str | bool | None = None, strict: bool | None = None,
                   **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (LangChain tools, functions, pydantic models, TypedDicts or JSON schemas).

        Args:
            tools: the tools, converted with `convert_to_openai_tool` (a recursive pydantic model keeps its
                `$defs`, so that its nested objects are constrained too).
            tool_choice: "auto" (default: the model decides), "none" (no call), "any" / "required"
                (some tool must be called), a tool's name (that tool must be called), True (a call
                is required), False (same as "auto"), or a dict naming a function
                (`{"type": "function", "function": {"name": ...}}` or `{"type": "tool", "name": ...}`).
                Enforced by constrained decoding.
            strict: passed to `convert_to_openai_tool` (arguments must match the schema exactly).
            **kwargs: other call arguments to bind (e.g. `documents`).
        """
        formatted = [_openai_tool(t, strict=strict) for t in tools]
        choice = _normalize_tool_choice(tool_choice, [t["function"]["name"] for t in formatted])
        if choice is not None:
            kwargs["tool_choice"] = choice
        return super().bind(tools=formatted, **kwargs)

    def with_structured_output(self, schema: dict | type | None = None, *,
                               method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
                               include_raw: bool = False, strict: bool | None = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, dict | Any]:
        """A runnable that answers with an instance of `schema` (a pydantic class, or a dict for TypedDict
        and JSON-schema inputs).

        Args:
            schema: pydantic class (v1 or v2), TypedDict class, JSON schema or OpenAI function dict
                (optional with "json_mode": the parsed answer is then a dict).
            method: "function_calling" (default: a forced call to a tool made from the schema),
                "json_schema" (the answer is JSON constrained to the schema) or "json_mode" (any JSON
                object; say in the prompt what keys you want).
            include_raw: return `{"raw": AIMessage, "parsed": ..., "parsing_error": ...}` instead of
                raising on a parsing error.
            strict: require the output to match the schema exactly (function_calling and json_schema).
        """
        if kwargs:
            raise TypeError(f"ChatJamba.with_structured_output got unexpected arguments {sorted(kwargs)}")
        if schema is None and method != "json_mode":
            raise ValueError(f"schema is required for method={method!r}")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        trace = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        if method == "function_calling":
            tool_name = _openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=tool_name, strict=strict,
                                  ls_structured_output_format={**trace, "schema": _openai_tool(schema)})
            parser: Runnable = (_PydanticToolsParser(tools=[schema], first_tool_only=True) if is_pydantic
                                else _JsonOutputKeyToolsParser(key_name=tool_name, first_tool_only=True))
        elif method == "json_schema":
            json_schema = _json_schema(schema, strict=strict)
            response_format = {"type": "json_schema", "json_schema": {
                "name": json_schema.get("title", "response"), "schema": json_schema, "strict": bool(strict)}}
            llm = self.bind(response_format=response_format, ls_structured_output_format=trace)
            parser = _PydanticOutputParser(pydantic_object=schema) if is_pydantic else _JsonOutputParser()
        elif method == "json_mode":
            llm = self.bind(response_format={"type": "json_object"}, ls_structured_output_format=trace)
            parser = _PydanticOutputParser(pydantic_object=schema) if is_pydantic else _JsonOutputParser()
        else:
            raise ValueError(f"method must be 'function_calling', 'json_schema' or 'json_mode', got {method!r}")
        if not include_raw:
            return llm | parser

        # The parse runs once, on the whole message, and its error is returned: in a stream, LangChain's
        # fallback (`with_fallbacks`) catches only errors raised before the first chunk, and the last
        # chunk's check (`_CutOffCheck`) raises after the raw chunks have gone out.
        def parse(raw: BaseMessage) -> dict[str, Any]:
            try:
                return {"parsed": parser.invoke(raw), "parsing_error": None}
            except Exception as error:  # noqa: BLE001 (any parsing error is returned, as ChatOpenAI's fallback does)
                return {"parsed": None, "parsing_error": error}

        def unpack(chunk: dict[str, Any]) -> dict[str, Any]:  # {"raw"} or {"result": {"parsed", "parsing_error"}}
            return {**{k: v for k, v in chunk.items() if k != "result"}, **chunk.get("result", {})}

        def flatten(chunks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            yield from map(unpack, chunks)

        async def aflatten(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
            async for chunk in chunks:
                yield unpack(chunk)

        return (RunnableMap(raw=llm) | RunnablePassthrough.assign(result=itemgetter("raw") | RunnableLambda(parse))
                | RunnableGenerator(flatten, aflatten))


@dataclass
class _Request:
    """One call in `jamba_core.chat`'s terms: `override` is a per-call `model=`, `params` are
    `chat_stream`'s keyword arguments but `max_new_tokens` (`max_tokens` None: the rest of the context)."""

    override: str | None
    model_name: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    max_tokens: int | None


class _CutOffCheck:
    """Mixed into LangChain's output parsers for `with_structured_output`: when the complete answer does
    not parse (the tool parsers return None, the JSON ones raise) and generation stopped at `max_tokens`
    (finish_reason "length"), raise `OutputParserException` saying so. LangChain's JSON parsers repair
    cut text (`'{"setup": "",'` parses as `{"setup": ""}`), so a cut JSON answer must parse without
    repair. An answer that the grammar closed on the last token parses and is returned.

    In a stream the last chunk (the one that carries finish_reason) is parsed whole, as `invoke` parses
    the message: LangChain's cumulative parsers only make partial parses, which keep quiet about an
    answer that fails the schema or was cut, so such a stream ended with the last partial object, or
    with nothing."""

    def parse_result(self, result: list[Any], *, partial: bool = False) -> Any:
        message = getattr(result[0], "message", None) if result else None
        finish_reason = (getattr(message, "response_metadata", None) or {}).get("finish_reason")
        partial = partial and finish_reason is None
        cut = finish_reason == "length"
        try:
            parsed = super().parse_result(result, partial=partial)
            if cut and isinstance(self, JsonOutputParser):
                parse_json_markdown(result[0].text, parser=json.loads)
        except (OutputParserException, json.JSONDecodeError):
            if not cut:
                raise
            parsed = None
        if parsed is None and cut:
            used = (getattr(message, "usage_metadata", None) or {}).get("output_tokens")
            raise OutputParserException(
                f"the structured answer was cut off at max_tokens ({used} tokens generated) before it was complete: "
                "raise max_tokens", llm_output=str(message.content))
        if parsed is None and not partial:  # the tool parsers' "no call": the forced call did not parse
            errors = [c.get("error") for c in getattr(message, "invalid_tool_calls", None) or []]
            raise OutputParserException(
                f"the structured answer holds no valid call (finish_reason {finish_reason!r}"
                + (f"; invalid call: {errors[0]}" if errors else "") + ")", llm_output=str(getattr(message, "content", "")))
        return parsed


class _PydanticToolsParser(_CutOffCheck, PydanticToolsParser):
    pass


class _JsonOutputKeyToolsParser(_CutOffCheck, JsonOutputKeyToolsParser):
    pass


class _PydanticOutputParser(_CutOffCheck, PydanticOutputParser):
    pass


class _JsonOutputParser(_CutOffCheck, JsonOutputParser):
    pass


def _last_result(events: Iterator[Any]) -> Any:
    """The `ChatResult` that ends a `chat_stream`."""
    from jamba_core.chat.api import ChatDone

    for event in events:
        if isinstance(event, ChatDone):
            return event.result
    raise RuntimeError("chat_stream ended without a result")


def _chat_result(result: Any, model_name: str) -> ChatResult:
    if result is None:
        raise RuntimeError("chat_stream ended without a result")
    return ChatResult(generations=[ChatGeneration(message=_to_ai_message(result, model_name))])


# -- LangChain -> OpenAI-shaped messages ----------------------------------------------------------------
def _convert_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    return [_convert_message(m) for m in messages]


def _convert_message(message: BaseMessage) -> dict[str, Any]:
    """One LangChain message -> `{"role", "content", ...}` as `jamba_core.chat.render_chat` reads it."""
    if isinstance(message, SystemMessage):
        out = {"role": "system", "content": _text_of(message.content, "system")}
    elif isinstance(message, HumanMessage):
        out = {"role": "user", "content": _user_content(message.content)}
    elif isinstance(message, AIMessage):
        out = {"role": "assistant", "content": _text_of(message.content, "assistant", drop_other=True)}
        calls = [_openai_tool_call(c["id"], c["name"], c["args"]) for c in message.tool_calls]
        # a stream's invalid call ends with text added to keep LangChain from repairing it (`_to_chunk`):
        # the history shows what the model wrote, which the last chunk's metadata keeps
        written = {c.get("id"): c.get("args") for c in message.response_metadata.get("invalid_tool_calls") or []}
        calls += [_openai_tool_call(c.get("id"), c.get("name") or "", written.get(c.get("id"), c.get("args")) or "")
                  for c in message.invalid_tool_calls if c.get("name")]
        if calls:
            out["tool_calls"] = calls
        if message.response_metadata.get("citations"):
            out["citations"] = list(message.response_metadata["citations"])
    elif isinstance(message, ToolMessage):
        out = {"role": "tool", "content": _tool_content(message.content, message.status), "tool_call_id": message.tool_call_id}
    elif isinstance(message, FunctionMessage):
        out = {"role": "tool", "content": _tool_content(message.content, "success")}
    elif isinstance(message, ChatMessage):
        role = {"human": "user", "ai": "assistant"}.get(message.role, message.role)
        out = {"role": role, "content": _user_content(message.content)}
    else:
        raise ValueError(f"ChatJamba cannot send a {type(message).__name__} to the model")
    if message.name:
        out["name"] = message.name
    return out


def _openai_tool_call(call_id: str | None, name: str, args: Any) -> dict[str, Any]:
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _check_block(block: Any, role: str) -> None:
    if isinstance(block, Mapping) and block.get("type") in _MEDIA_BLOCKS:
        raise ValueError(f"ChatJamba reads text only: {'an' if role[:1] in 'aeio' else 'a'} {role} message holds a {block['type']!r} block")


def _block_text(block: Any) -> str | None:
    if isinstance(block, str):
        return block
    if isinstance(block, Mapping) and block.get("type") in _TEXT_BLOCKS and isinstance(block.get("text"), str):
        return block["text"]
    return None


def _text_of(content: str | list, role: str, drop_other: bool = False) -> str:
    """Text of message content: a string as is, list content as its text blocks joined.

    Non-text blocks raise (media) or, with `drop_other`, are skipped: an assistant's `tool_use`,
    `tool_call` or `thinking` blocks are either carried by `tool_calls` or not for the model to see."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        _check_block(block, role)
        text = _block_text(block)
        if text is not None:
            parts.append(text)
        elif not drop_other:
            parts.append(json.dumps(block, ensure_ascii=False))
    return "".join(parts)


def _user_content(content: str | list) -> str | list:
    """User content: text, or a list of blocks the template writes as JSON when any is not text."""
    if isinstance(content, str):
        return content
    for block in content:
        _check_block(block, "user")
    return _text_of(content, "user") if all(_block_text(b) is not None for b in content) else list(content)


def _tool_content(content: str | list, status: str) -> str:
    """A tool result as text; a failed call says so, since the template has no status field."""
    text = _text_of(content, "tool")
    if status == "error" and not text.lstrip().lower().startswith("error"):
        text = f"Error: {text}"
    return text


def _convert_documents(documents: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    """Documents (LangChain `Document`, dict with `text`, or plain string) -> dicts with `text`, `title`
    and simple metadata fields, as the Jamba template shows them."""
    if not documents:
        return None
    out = []
    for i, doc in enumerate(documents):
        if isinstance(doc, Document):
            item = {"text": doc.page_content}
            for key, value in doc.metadata.items():
                if key != "text" and isinstance(value, (str, int, float, bool)):
                    item[key] = value
        elif isinstance(doc, str):
            item = {"text": doc}
        elif isinstance(doc, Mapping):
            item = dict(doc)
            if "text" not in item and isinstance(item.get("page_content"), str):
                item["text"] = item.pop("page_content")
        else:
            raise ValueError(f"document {i} must be a Document, a dict with 'text', or a string; got {type(doc).__name__}")
        out.append(item)
    return out


def _normalize_tool_choice(tool_choice: Any, names: list[str]) -> str | None:
    """LangChain's tool_choice forms -> "auto" | "none" | "any" | "required" | a tool name (None: not set)."""
    if tool_choice is None:
        return None
    if tool_choice is True:
        return "required"
    if tool_choice is False:
        return "auto"
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else tool_choice.get("name")
        if name is None and tool_choice.get("type") in _CHOICE_WORDS:
            return tool_choice["type"]
        if name is None:
            raise ValueError(f"tool_choice dict names no function: {tool_choice!r}")
        tool_choice = name
    if not isinstance(tool_choice, str):
        raise ValueError(f"tool_choice must be a string, bool or dict, got {tool_choice!r}")
    if tool_choice not in _CHOICE_WORDS and tool_choice not in names:
        raise ValueError(f"tool_choice={tool_choice!r} is neither one of {_CHOICE_WORDS} nor a bound tool {names}")
    return tool_choice


def _recursive_schema(schema: Any) -> dict[str, Any] | None:
    """A pydantic v2 model's own JSON schema when it is recursive (a `$defs` entry that reaches itself, such
    as ``children: list["Node"]``), with the root's fields at the top and the `$defs` beside them; else None.
    LangChain's converters inline every `$ref` and leave a recursive one as ``{}`` (any value), so the
    grammar built from their schema would let a `Node` hold strings where nodes belong."""
    if not (isinstance(schema, type) and is_basemodel_subclass(schema) and hasattr(schema, "model_json_schema")):
        return None
    full = schema.model_json_schema()
    defs = full.get("$defs") or {}

    def refs(node: Any) -> set[str]:
        if isinstance(node, dict):
            found = {node["$ref"].rsplit("/", 1)[-1]} if isinstance(node.get("$ref"), str) else set()
            return found.union(*(refs(v) for v in node.values()))
        return set().union(*(refs(v) for v in node)) if isinstance(node, list) else set()

    def reaches_itself(name: str) -> bool:
        seen, todo = set(), list(refs(defs.get(name, {})))
        while todo:
            n = todo.pop()
            if n == name:
                return True
            if n not in seen:
                seen.add(n)
                todo += refs(defs.get(n, {}))
        return False

    if not any(reaches_itself(n) for n in defs):
        return None
    root = dict(defs[full["$ref"].rsplit("/", 1)[-1]]) if "$ref" in full else {k: v for k, v in full.items() if k != "$defs"}
    return {**root, "$defs": defs}


def _openai_tool(tool: Any, strict: bool | None = None) -> dict[str, Any]:
    """`convert_to_openai_tool`, except that a recursive pydantic model's parameters keep their `$defs`."""
    formatted = convert_to_openai_tool(tool, strict=strict)
    recursive = _recursive_schema(tool)
    if recursive is not None:
        params = {k: v for k, v in recursive.items() if k not in ("title", "description")}
        formatted["function"]["parameters"] = _closed(params) if strict else params
    return formatted


def _json_schema(schema: Any, strict: bool | None = None) -> dict[str, Any]:
    """`convert_to_json_schema`, except that a recursive pydantic model keeps its `$defs`."""
    recursive = _recursive_schema(schema)
    if recursive is None:
        return convert_to_json_schema(schema, strict=strict)
    return _closed(recursive) if strict else recursive


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """``additionalProperties: false`` on the root object and every `$defs` object (strict mode)."""
    defs = {n: {**d, "additionalProperties": False} if d.get("type") == "object" else d for n, d in schema.get("$defs", {}).items()}
    return {**schema, "additionalProperties": False, "$defs": defs}


def _normalize_response_format(response_format: Any) -> dict[str, Any] | None:
    """A response format as `jamba_core.chat` reads it: OpenAI's dict forms as they are; a pydantic or
    TypedDict class becomes a JSON-schema format."""
    if response_format is None or isinstance(response_format, Mapping):
        return response_format
    schema = _json_schema(response_format)
    return {"type": "json_schema", "json_schema": {"name": schema.get("title", "response"), "schema": schema}}


# -- results -> LangChain messages -----------------------------------------------------------------------
def _usage_metadata(usage: Any) -> UsageMetadata | None:
    if usage is None:
        return None
    return UsageMetadata(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        input_token_details=InputTokenDetails(cache_read=getattr(usage, "cached_tokens", 0) or 0),
    )


def _response_metadata(result: Any, model_name: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"model_name": model_name, "model_provider": PROVIDER, "finish_reason": result.finish_reason}
    timings = result.timings
    if timings is not None:
        meta["time_to_first_token"] = timings.time_to_first_token_s
        meta["prefill_tokens_per_s"] = timings.prefill_tokens_per_s
        meta["decode_tokens_per_s"] = timings.decode_tokens_per_s
    meta["citations"] = list(result.citations)
    meta["invalid_tool_calls"] = [dict(c) for c in result.invalid_tool_calls]  # as written, with the error
    if getattr(result, "logprobs", None) is not None:
        meta["logprobs"] = {"content": [_openai_logprob(e, top=True) for e in result.logprobs]}
    return meta


def _openai_logprob(entry: Any, top: bool = False) -> dict[str, Any]:
    """A `jamba_core.engine.TokenLogprob` in OpenAI's chat-completion layout."""
    out = {"token": entry.token, "bytes": list(entry.bytes), "logprob": entry.logprob}
    if top:
        out["top_logprobs"] = [_openai_logprob(t) for t in entry.top_logprobs]
    return out


def _engine_logprobs(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    """ChatOpenAI's two settings -> `Engine.stream`'s ``logprobs`` (None, or the alternatives per token).

    Raises ValueError for top_logprobs outside 0..20 or given without logprobs=True (as OpenAI's API)."""
    from jamba_core.engine import check_logprobs

    if top_logprobs is not None:
        check_logprobs(top_logprobs, "top_logprobs")
        if not logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
    return (top_logprobs or 0) if logprobs else None


def _to_ai_message(result: Any, model_name: str) -> AIMessage:
    """A `jamba_core.chat.api.ChatResult` -> AIMessage (tool calls, invalid calls, usage, metadata)."""
    return AIMessage(
        content=result.content,
        additional_kwargs={"reasoning_content": result.reasoning} if getattr(result, "reasoning", "") else {},
        tool_calls=[tool_call(name=c["name"], args=c["args"], id=c["id"]) for c in result.tool_calls],
        invalid_tool_calls=[invalid_tool_call(name=c.get("name"), args=c.get("args"), id=c.get("id"), error=c.get("error"))
                            for c in result.invalid_tool_calls],
        usage_metadata=_usage_metadata(result.usage),
        response_metadata=_response_metadata(result, model_name),
    )


class _StreamState:
    """What a stream has sent so far: the argument text of each tool-call index."""

    def __init__(self) -> None:
        self.call_args: dict[int, str] = {}


def _to_chunk(event: Any, model_name: str, state: _StreamState) -> AIMessageChunk | None:
    """One `chat_stream` event -> AIMessageChunk: text, a tool-call fragment, or (last) usage and metadata.

    Usage and response metadata ride on the last chunk only, so that merging the chunks counts them once.
    Citations come with that last chunk too (in `response_metadata`), as on invoke."""
    from jamba_core.chat.api import ChatDone, ContentDelta, InvalidToolCall, ReasoningDelta, ToolCallChunk

    if isinstance(event, ContentDelta):
        return AIMessageChunk(content=event.text) if event.text else None
    if isinstance(event, ReasoningDelta):  # merged chunks concatenate it, as ChatDeepSeek's and ChatOllama's
        return AIMessageChunk(content="", additional_kwargs={"reasoning_content": event.text})
    if isinstance(event, ToolCallChunk):
        state.call_args[event.index] = state.call_args.get(event.index, "") + event.args_delta
        return AIMessageChunk(content="", tool_call_chunks=[
            tool_call_chunk(name=event.name, args=event.args_delta or None, id=event.id, index=event.index)])
    if isinstance(event, InvalidToolCall):
        # The call is unusable. LangChain merges chunk args with `parse_partial_json`, which would repair
        # what was sent (or the raw text) into a callable dict, so end the args with text that makes
        # the merged call land in `invalid_tool_calls`, as on invoke.
        if event.index in state.call_args:
            sent = state.call_args[event.index]
            args, name, call_id = _spoiling_suffix(sent), None, None
        else:
            args, name, call_id = event.args, event.name, event.id
            if _parses_to_dict(args):
                args += _spoiling_suffix(args)
        state.call_args[event.index] = state.call_args.get(event.index, "") + args
        return AIMessageChunk(content="", tool_call_chunks=[tool_call_chunk(name=name, args=args, id=call_id, index=event.index)])
    if isinstance(event, ChatDone):
        result = event.result
        return AIMessageChunk(content="", usage_metadata=_usage_metadata(result.usage),
                              response_metadata=_response_metadata(result, model_name), chunk_position="last")
    return None  # e.g. citations: the last chunk carries them


def _parses_to_dict(text: str) -> bool:
    """Whether LangChain's merge would read `text` (tool-call chunk args) as arguments."""
    if not text:
        return True
    try:
        return isinstance(parse_partial_json(text), dict)
    except ValueError:
        return False


def _spoiling_suffix(prefix: str) -> str:
    """Text that, appended to tool-call args `prefix`, makes `parse_partial_json` give up on the whole:
    close an open string, then a bracket that does not match the innermost open one (the parser's
    "mismatched closing character" case)."""
    in_string = escaped = False
    open_brackets: list[str] = []
    for ch in prefix:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            open_brackets.append(ch)
        elif ch in "}]" and open_brackets:
            open_brackets.pop()
    suffix = ('x"' if escaped else '"') if in_string else ""
    return suffix + ("}" if open_brackets and open_brackets[-1] == "[" else "]")


# -- running generation off the event loop ------------------------------------------------------------
# -- small helpers -------------------------------------------------------------------------------------
def _is_engine(value: Any) -> bool:
    return value is not None and not isinstance(value, (str, os.PathLike)) and hasattr(value, "stream") and hasattr(value, "tokenizer")


def _context_window_without_loading(model: str | None) -> int | None:
    """`max_position_embeddings` from the checkpoint's config.json when it is on disk (a folder, or the
    Hugging Face cache); None otherwise. Reads one small file: building a ChatJamba stays cheap."""
    if not model:
        return None
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # not a repo id, no cache: the window stays unknown until the engine loads
            return None
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    try:
        value = json.loads(config.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) else None
