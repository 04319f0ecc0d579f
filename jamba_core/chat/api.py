"""Chat requests for the adapters: messages + tools + documents in, content + tool calls + usage out.

Everything both adapters need lives here once: rendering with the checkpoint's template, the
constraint for ``tool_choice`` / ``response_format``, generation, and tool-call / citation parsing
(whole and streamed). The adapters only translate their message types to and from these dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:  # the engine imports the tokenizer, which imports this package's template
    from ..engine import Engine, Timings, Usage
from .grammar import (BannedTokensConstraint, EitherConstraint, GrammarConstraint, response_format_constraint,
                      tool_choice_constraint)
from .reasoning import ReasoningDelta, ReasoningSplitter, is_reasoning_template, prompt_opens_thinking
from .tool_calls import CALL_MARKERS, Citations, ContentDelta, InvalidToolCall, StreamingToolCallParser, ToolCallChunk, detect_call_format


@dataclass
class ChatResult:
    """One assistant turn. ``tool_calls``: ``[{"id", "name", "args": dict}]``; ``invalid_tool_calls``:
    ``[{"id", "name", "args": raw str, "error"}]``; ``citations``: document indices; ``text``: the raw
    model output the rest was parsed from; ``logprobs``: one `jamba_core.engine.TokenLogprob` per generated
    token of ``text`` when the request asked (``logprobs=N``), else None; ``reasoning``: a reasoning model's
    thinking (``<think> ... </think>``, `jamba_core.chat.reasoning`), apart from ``content`` and never parsed
    for calls ("" for other models)."""

    content: str
    tool_calls: list[dict] = field(default_factory=list)
    invalid_tool_calls: list[dict] = field(default_factory=list)
    citations: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: Usage | None = None
    timings: Timings | None = None
    text: str = ""
    logprobs: list | None = None
    reasoning: str = ""


@dataclass
class ChatDone:
    """Last event of `chat_stream`: the same result `chat` returns."""

    result: ChatResult


def call_format(engine: Engine) -> str:
    """The checkpoint's tool-call syntax ("jamba" or "hermes"), from its template and vocabulary."""
    fmt = getattr(engine, "_call_format", None)
    if fmt is None:
        fmt = engine._call_format = detect_call_format(getattr(engine.tokenizer, "chat_template", None), engine.tokenizer.get_vocab())
    return fmt


def thinks(engine: Engine) -> bool:
    """Whether the checkpoint is a reasoning model: its chat template writes ``<think>``."""
    flag = getattr(engine, "_thinks", None)
    if flag is None:
        flag = engine._thinks = is_reasoning_template(getattr(engine.tokenizer, "chat_template", None))
    return flag


def _constraint(engine: Engine, tools, tool_choice, response_format, parallel_tool_calls=True):
    """The constraint for a request: a forced call (tool_choice a name, "any", "required"); else the
    response format's (with tools and "auto": a call or the answer; with "none": the answer); else
    "none"'s ban on call markers; else None (free text)."""
    if tools and tool_choice not in (None, "auto", "none") or tools and tool_choice == "none" and response_format is None:
        return tool_choice_constraint(engine.tokenizer, tools, tool_choice, call_format=call_format(engine),
                                      vocab_size=engine.config.vocab_size, stop_token_ids=engine.stop_ids,
                                      parallel_tool_calls=parallel_tool_calls)
    if response_format is not None:
        answer = response_format_constraint(engine.tokenizer, response_format, vocab_size=engine.config.vocab_size,
                                            stop_token_ids=engine.stop_ids)
        if tools and tool_choice in (None, "auto") and isinstance(answer, GrammarConstraint):
            calls = tool_choice_constraint(engine.tokenizer, tools, "required", call_format=call_format(engine),
                                           vocab_size=engine.config.vocab_size, stop_token_ids=engine.stop_ids,
                                           parallel_tool_calls=parallel_tool_calls)
            return EitherConstraint(calls, answer)  # call a tool, or answer in the format
        return answer
    return None


def _validate_tool_choice(tools, tool_choice):
    if tool_choice in (None, "auto", "none", "any", "required"):
        return
    names = [(t.get("function") or t).get("name") for t in tools or []]
    if tool_choice not in names:
        raise ValueError(f"tool_choice={tool_choice!r} names no bound tool; tools: {names}")


def chat_stream(engine: Engine, messages: list[dict], *, tools=None, tool_choice="auto", documents=None, response_format=None,
                citations: bool = False, parallel_tool_calls: bool = True, **generation) -> Iterator:
    """Stream one assistant turn: `ReasoningDelta` (a reasoning model's thinking, first), `ContentDelta`,
    `ToolCallChunk`, `InvalidToolCall` and `Citations` events, then `ChatDone`. A reasoning model's output
    (`thinks`) is split at ``</think>`` unless a grammar shapes it (a forced call or a JSON answer, which start at
    once; ``tool_choice="none"``'s ban on call markers leaves the text free, so it is split). ``generation``:
    `Engine.stream` arguments (max_new_tokens, temperature, top_p, top_k, seed, stop, logprobs).
    ``parallel_tool_calls=False`` makes a forced ``"any"``/``"required"`` choice exactly one call. Raises
    ``ValueError`` for a ``tool_choice`` that names no tool."""
    _validate_tool_choice(tools, tool_choice)
    constraint = _constraint(engine, tools, tool_choice, response_format, parallel_tool_calls)
    fmt = call_format(engine)
    parser = StreamingToolCallParser(fmt, tool_calls=bool(tools) and tool_choice != "none")
    splitter = None
    if (constraint is None or isinstance(constraint, BannedTokensConstraint)) and thinks(engine):  # free text
        prompt = engine.render(messages, tools=tools, documents=documents, response_format=response_format,
                               citations=citations)
        splitter = ReasoningSplitter(opened=prompt_opens_thinking(prompt))

    def route(parts):  # the splitter's (kind, text) -> reasoning events, or answer text for the call parser
        for kind, piece in parts:
            if kind == "reasoning":
                yield ReasoningDelta(piece)
            else:
                yield from parser.feed(piece)

    pieces, last = [], None
    logprobs = [] if generation.get("logprobs") is not None else None
    markup = CALL_MARKERS[fmt] if tools and tool_choice != "none" else None  # a free call: stop strings end text, not calls
    for chunk in engine.stream(messages, tools=tools, documents=documents, response_format=response_format,
                               citations=citations, constraint=constraint, markup=markup, **generation):
        last = chunk
        if logprobs is not None and chunk.logprobs:
            logprobs.extend(chunk.logprobs)
        if chunk.text:
            pieces.append(chunk.text)
            yield from route(splitter.feed(chunk.text)) if splitter else parser.feed(chunk.text)
    if splitter:
        yield from route(splitter.finish())
    yield from parser.finish()
    text = "".join(pieces)
    parsed = parser.result()  # the whole parse, with the ids the stream announced
    finish = last.finish_reason
    if parsed.tool_calls and finish == "stop":
        finish = "tool_calls"
    yield ChatDone(ChatResult(parsed.content, parsed.tool_calls, parsed.invalid_tool_calls, parsed.citations,
                              finish, last.usage, last.timings, text, logprobs,
                              "".join(splitter.reasoning) if splitter else ""))


def chat(engine: Engine, messages: list[dict], **kwargs) -> ChatResult:
    """One assistant turn, whole. Arguments as `chat_stream`."""
    for event in chat_stream(engine, messages, **kwargs):
        if isinstance(event, ChatDone):
            return event.result
    raise RuntimeError("chat_stream ended without a result")


__all__ = ["chat", "chat_stream", "ChatResult", "ChatDone", "ContentDelta", "ReasoningDelta", "ToolCallChunk", "InvalidToolCall",
           "Citations", "call_format", "thinks"]
