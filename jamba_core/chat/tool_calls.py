"""Tool-call and citation parsing of model output, whole and streamed, in one scanner.

Two call syntaxes:
- ``"jamba"`` (Jamba 1.5-1.7): ``<tool_calls>[{"name": ..., "arguments": {...}}, ...]</tool_calls>``, one block
  holding a JSON array, possibly after some text (the chat template's ``handle_tool_calls`` macro).
- ``"hermes"`` (Jamba Reasoning 3B, ChatML): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one
  block per call.
Citations (Jamba's citation mode): ``<citations>[0, 2]</citations>``, document indices.

`parse_output` is `StreamingToolCallParser` fed the whole text at once, so the whole and the streamed parse
agree by construction; the scanner reads each character once and keeps its state between deltas, so any
splitting of the text gives the same events, joined.

Rules (the same for both paths):
- content is the text outside call and citation blocks, joined, then ``str.strip()``-ed (the template puts a
  space after ``<|assistant|>``). Streamed, leading whitespace is dropped and a whitespace run is held
  back until more content follows it. Marker text never reaches content; a stray closing call marker is
  dropped.
- Each call object in a block is judged on its own: a complete, valid object is a call even when the
  block's closing marker (or the array's ``]``) never came because generation stopped; an object cut off,
  malformed, without a string ``name``, or whose ``arguments`` is not an object (or a JSON string holding
  one) is an invalid call carrying its raw text and the error. Nothing raises.
- ``arguments`` given as a JSON string is decoded; ``"parameters"`` is read when ``"arguments"`` is absent;
  missing, ``null`` or ``""`` arguments are ``{}``.
- A citation block whose body is not a list of non-negative integers (JSON, or the Python list repr the
  template writes) is left in the content verbatim, markers included, so that nothing the model wrote is
  lost; so is one never closed.
- Stream indices number call attempts in order of appearance, invalid ones included; when every call is
  valid, index i is ``tool_calls[i]``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Union

CALL_MARKERS = {"jamba": ("<tool_calls>", "</tool_calls>"), "hermes": ("<tool_call>", "</tool_call>")}
CITATIONS_OPEN, CITATIONS_CLOSE = "<citations>", "</citations>"

_JSON_WS = " \t\n\r"
_STRING_STOP = re.compile(r'["\\]')
_CITATION_ITEM = re.compile(r"""\s*(?:(\d+)|"(\d+)"|'(\d+)')\s*""")


def new_call_id() -> str:
    """A fresh tool-call id: ``call_`` + 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ContentDelta:
    """Assistant text, in order; the deltas join to `ParsedOutput.content`."""

    text: str


@dataclass(frozen=True)
class ToolCallChunk:
    """A piece of call ``index``: ``id`` and ``name`` in its first chunk only (else None), then argument
    text; the ``args_delta`` of one index join to a JSON object, the call's arguments."""

    index: int
    id: str | None
    name: str | None
    args_delta: str


@dataclass(frozen=True)
class InvalidToolCall:
    """Call ``index`` cannot be used (discard any chunks it had): ``args`` is the raw text of its
    arguments where the output ended inside them (what its chunks sent), else the call's raw text."""

    index: int
    id: str
    name: str | None
    args: str
    error: str


@dataclass(frozen=True)
class Citations:
    """Document indices from a ``<citations>`` block."""

    citations: list[int]


Event = Union[ContentDelta, ToolCallChunk, InvalidToolCall, Citations]


@dataclass
class ParsedOutput:
    """A parsed assistant turn.

    ``tool_calls``: ``[{"id", "name", "args": dict}]``; ``invalid_tool_calls``: ``[{"id", "name": str | None,
    "args": raw str, "error"}]``; ``citations``: document indices, in the order written.
    """

    content: str
    tool_calls: list[dict] = field(default_factory=list)
    invalid_tool_calls: list[dict] = field(default_factory=list)
    citations: list[int] = field(default_factory=list)


def detect_call_format(chat_template: str | None, vocab: Iterable[str]) -> str:
    """The tool-call syntax of a checkpoint: ``"jamba"`` or ``"hermes"``.

    The chat template decides when it names a marker (``<tool_calls>`` -> jamba, ``<tool_call>`` -> hermes);
    else the vocabulary's tokens; else ``"jamba"``. ``vocab``: token strings (a ``get_vocab()`` dict works).
    """
    for source in (chat_template or "", set(vocab)):
        if CALL_MARKERS["jamba"][0] in source:
            return "jamba"
        if CALL_MARKERS["hermes"][0] in source:
            return "hermes"
    return "jamba"


def parse_output(text: str, call_format: str = "jamba") -> ParsedOutput:
    """Parse a whole model output into content, tool calls, invalid tool calls and citations.

    ``text``: the decoded output with the marker tokens kept. Never raises on malformed output.
    """
    parser = StreamingToolCallParser(call_format)
    parser.feed(text)
    parser.finish()
    return parser.result()


class ToolCallParser:
    """The parsers for one call syntax: `parse_output` for a whole text, `stream` for deltas."""

    def __init__(self, call_format: str = "jamba"):
        _check_format(call_format)
        self.call_format = call_format

    def parse_output(self, text: str) -> ParsedOutput:
        """See the module function `parse_output`."""
        return parse_output(text, self.call_format)

    def stream(self) -> StreamingToolCallParser:
        """A new streaming parser for this syntax."""
        return StreamingToolCallParser(self.call_format)


def _check_format(call_format: str) -> None:
    if call_format not in CALL_MARKERS:
        raise ValueError(f"call_format must be one of {sorted(CALL_MARKERS)}, got {call_format!r}")


def _parse_citations(body: str) -> list[int] | None:
    """``[0, 2]`` / ``['0', '2']`` / ``[]`` -> ints; anything else -> None."""
    body = body.strip()
    if not (body.startswith("[") and body.endswith("]")):
        return None
    inner = body[1:-1]
    if not inner.strip():
        return []
    ids = []
    for item in inner.split(","):
        match = _CITATION_ITEM.fullmatch(item)
        if match is None:
            return None
        try:
            ids.append(int(next(g for g in match.groups() if g is not None)))
        except ValueError:  # more digits than Python converts (4,300): no document has that index
            return None
    return ids


def _call_from_json(obj) -> tuple[str, dict]:
    """(name, args) of one decoded call object; raises ValueError saying what is wrong."""
    if isinstance(obj, dict) and "name" not in obj and isinstance(obj.get("function"), dict):
        obj = obj["function"]  # an OpenAI-shaped call
    if not isinstance(obj, dict):
        raise ValueError(f"a tool call must be a JSON object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a tool call needs a non-empty string 'name'")
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    if args is None or (isinstance(args, str) and not args.strip()):
        return name, {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as exc:
            raise ValueError(f"'arguments' is a string that is not valid JSON: {exc}") from None
        except RecursionError:
            raise ValueError("'arguments' is a string of JSON nested too deeply to read") from None
    if not isinstance(args, dict):
        raise ValueError(f"'arguments' must be a JSON object, got {type(args).__name__}")
    return name, args


class _Call:
    """Scanner state of one call object inside a block."""

    def __init__(self, start: int):
        self.start = start  # offset of its '{' in the block body
        self.index: int | None = None  # stream index, once announced
        self.id: str | None = None
        self.name: str | None = None  # first top-level "name" string
        self.key: str | None = None  # the top-level key whose value is being read
        self.expect_key = True
        self.capture: list[str] | None = None  # raw chars of a top-level string being read
        self.capture_role = ""  # "key" | "name" | "args"
        self.args_kind = ""  # "" | "raw" (object/array, streamed) | "string" | "other" (decoded at the end)
        self.args_done = False
        self.args: list[str] = []  # raw text of a streamed arguments value
        self.sent = 0  # chars of self.args already emitted


class StreamingToolCallParser:
    """Incremental parser: `feed` text deltas, then `finish`; events join to `parse_output`'s result.

    Marker prefixes (``"<tool_c"``) are held back until disambiguated. `result` gives the `ParsedOutput`
    built from the events (with the ids they announced) once `finish` was called.
    """

    def __init__(self, call_format: str = "jamba", tool_calls: bool = True):
        """``tool_calls=False``: no tools were offered (or ``tool_choice="none"``), so call markers are
        plain content, never a call (OpenAI-style APIs return no calls then; citations still parse)."""
        _check_format(call_format)
        self.call_format = call_format
        self._open, self._close = CALL_MARKERS[call_format]
        self._tool_calls = tool_calls
        self._text_markers = (self._open, CITATIONS_OPEN, self._close) if tool_calls else (CITATIONS_OPEN,)
        self._buf = ""
        self._state = "text"  # "text" | "calls" | "citations"
        self._started = False  # content seen a non-whitespace character
        self._pending_ws = ""
        self._next_index = 0
        self._finished = False
        # Block scanner state (reset per block).
        self._body: list[str] = []
        self._body_len = 0
        self._stack: list[str] = []
        self._array = False  # the block body opened with '['
        self._array_closed = False
        self._any_json = False
        self._call: _Call | None = None
        self._in_str = False
        self._esc = False
        self._error: tuple[int, str] | None = None  # (raw start in body, message) once the block is broken
        self._block_calls = 0
        # Aggregated result.
        self._content: list[str] = []
        self._calls: dict[int, dict] = {}
        self._invalid: list[dict] = []
        self._citations: list[int] = []

    # -- public --------------------------------------------------------------------------------------

    def feed(self, delta: str) -> list[Event]:
        """Consume a text delta; return the events it completes (possibly none)."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta
        events: list[Event] = []
        self._run(events, final=False)
        return self._record(events)

    def finish(self) -> list[Event]:
        """End of output: flush held-back text, close an unterminated block (its cut-off call is invalid)."""
        if self._finished:
            return []
        events: list[Event] = []
        self._run(events, final=True)
        if self._state == "calls":
            self._end_block(events, closed=False)
        elif self._state == "citations":
            self._emit_content(events, CITATIONS_OPEN + "".join(self._body) + self._buf)
        elif self._buf:
            self._emit_content(events, self._buf)
        self._buf = ""
        self._state = "text"
        self._finished = True
        return self._record(events)

    def result(self) -> ParsedOutput:
        """The whole parse of everything fed (call after `finish`)."""
        if not self._finished:
            raise RuntimeError("result() before finish()")
        calls = []
        for index in sorted(self._calls):
            call = self._calls[index]
            if call.get("invalid"):
                continue
            calls.append({"id": call["id"], "name": call["name"], "args": json.loads("".join(call["args"]))})
        return ParsedOutput("".join(self._content), calls, list(self._invalid), list(self._citations))

    # -- aggregation ---------------------------------------------------------------------------------

    def _record(self, events: list[Event]) -> list[Event]:
        for event in events:
            if isinstance(event, ContentDelta):
                self._content.append(event.text)
            elif isinstance(event, ToolCallChunk):
                call = self._calls.setdefault(event.index, {"id": event.id, "name": event.name, "args": []})
                call["args"].append(event.args_delta)
            elif isinstance(event, InvalidToolCall):
                self._calls.setdefault(event.index, {})["invalid"] = True
                self._invalid.append({"id": event.id, "name": event.name, "args": event.args, "error": event.error})
            else:
                self._citations.extend(event.citations)
        return events

    # -- text outside blocks -------------------------------------------------------------------------

    def _emit_content(self, events: list[Event], text: str) -> None:
        if not self._started:
            text = text.lstrip()
            if not text:
                return
            self._started = True
        body = text.rstrip()
        if body:
            events.append(ContentDelta(self._pending_ws + body))
            self._pending_ws = text[len(body):]
        else:
            self._pending_ws += text

    def _run(self, events: list[Event], final: bool) -> None:
        while self._buf:
            before = (self._state, len(self._buf), self._error)
            if self._state == "text":
                self._scan_text(events, final)
            elif self._state == "citations":
                self._scan_citations(events, final)
            else:
                self._scan_block(events, final)
            if (self._state, len(self._buf), self._error) == before:
                break  # waiting for more input

    def _scan_text(self, events: list[Event], final: bool) -> None:
        buf = self._buf
        hits = [(buf.find(m), m) for m in self._text_markers]
        hits = [(pos, m) for pos, m in hits if pos >= 0]
        if hits:
            pos, marker = min(hits, key=lambda h: (h[0], -len(h[1])))
            self._emit_content(events, buf[:pos])
            self._buf = buf[pos + len(marker):]
            if marker == self._open:
                self._start_block()
            elif marker == CITATIONS_OPEN:
                self._state = "citations"
                self._body = []
            return  # a stray closing call marker is dropped
        keep = 0 if final else _partial_marker_suffix(buf, self._text_markers)
        self._emit_content(events, buf[:len(buf) - keep])
        self._buf = buf[len(buf) - keep:]

    def _scan_citations(self, events: list[Event], final: bool) -> None:
        buf = self._buf
        close, reopen = buf.find(CITATIONS_CLOSE), buf.find(self._open) if self._tool_calls else -1
        if close >= 0 and (reopen < 0 or close < reopen):
            body = "".join(self._body) + buf[:close]
            ids = _parse_citations(body)
            if ids is None:
                self._emit_content(events, CITATIONS_OPEN + body + CITATIONS_CLOSE)
            else:
                events.append(Citations(ids))
            self._buf = buf[close + len(CITATIONS_CLOSE):]
            self._state = "text"
        elif reopen >= 0:  # a call block opens inside an unclosed citation block: the latter is text
            self._emit_content(events, CITATIONS_OPEN + "".join(self._body) + buf[:reopen])
            self._buf = buf[reopen + len(self._open):]
            self._start_block()
        else:
            keep = 0 if final else _partial_marker_suffix(buf, (CITATIONS_CLOSE, self._open) if self._tool_calls else (CITATIONS_CLOSE,))
            self._body.append(buf[:len(buf) - keep])
            self._buf = buf[len(buf) - keep:]

    # -- call blocks ---------------------------------------------------------------------------------

    def _start_block(self) -> None:
        self._state = "calls"
        self._body, self._body_len = [], 0
        self._stack, self._array, self._array_closed, self._any_json = [], False, False, False
        self._call, self._in_str, self._esc, self._error = None, False, False, None
        self._block_calls = 0

    def _take(self, text: str) -> None:
        self._body.append(text)
        self._body_len += len(text)

    def _scan_block(self, events: list[Event], final: bool) -> None:
        """Consume ``self._buf`` inside a call block, char by char (strings in runs)."""
        buf, i, n = self._buf, 0, len(self._buf)
        if self._error is not None:
            pos = buf.find(self._close)
            if pos >= 0:
                self._take(buf[:pos])
                self._buf = buf[pos + len(self._close):]
                self._end_block(events, closed=True)
                return
            keep = 0 if final else _partial_marker_suffix(buf, (self._close,))
            self._take(buf[:n - keep])
            self._buf = buf[n - keep:]
            return
        call = self._call
        while i < n:
            if self._in_str:
                i = self._scan_string(buf, i)
                continue
            ch = buf[i]
            if ch == "<":
                rest = buf[i:]
                if rest.startswith(self._close):
                    self._take(buf[:i])
                    self._buf = buf[i + len(self._close):]
                    if call is not None:
                        self._announce(events, call)
                    self._end_block(events, closed=True)
                    return
                if not final and self._close.startswith(rest):
                    break  # maybe the closing marker: wait
                self._fail(buf, i, "unexpected '<' in tool-call JSON")
                return
            if call is None:  # between call objects
                if ch in _JSON_WS or (ch == "," and self._array and not self._array_closed):
                    pass
                elif ch == "[" and not self._any_json:
                    self._array = self._any_json = True
                elif ch == "]" and self._array and not self._array_closed:
                    self._array_closed = True
                elif ch == "{" and not self._array_closed:
                    self._any_json = True
                    call = self._call = _Call(self._body_len + i)
                    self._stack.append("{")
                else:
                    self._fail(buf, i, f"unexpected {ch!r} in tool-call block")
                    return
                i += 1
                continue
            top = len(self._stack) == 1  # at the call object's own level
            reading_args = call.args_kind == "raw" and not call.args_done
            if ch == '"':
                self._in_str = True
                if top:
                    role = ("key" if call.expect_key else
                            "name" if call.key == "name" and call.name is None else
                            "args" if self._is_args_key(call) else "")
                    call.capture_role = role
                    call.capture = [] if role in ("key", "name") else None
                    if role == "args":
                        call.args_kind = "string"
                elif reading_args:
                    call.args.append(ch)
                i += 1
                continue
            if ch in "{[":
                if top and not call.expect_key and self._is_args_key(call):
                    call.args_kind = "raw"
                    reading_args = True
                self._stack.append(ch)
                if reading_args:
                    call.args.append(ch)
            elif ch in "}]":
                if self._stack[-1] != ("{" if ch == "}" else "["):
                    self._fail(buf, i, f"mismatched {ch!r} in tool-call JSON")
                    return
                self._stack.pop()
                if reading_args:
                    call.args.append(ch)
                    if len(self._stack) == 1:
                        call.args_done = True
                if not self._stack:
                    end = self._body_len + i + 1
                    self._take(buf[:i + 1])
                    buf, n, i = buf[i + 1:], n - i - 1, 0
                    self._end_call(events, "".join(self._body)[call.start:end], closed=True)
                    call = None
                    continue
            elif top and ch == ":":
                call.expect_key = False
            elif top and ch == ",":
                call.expect_key, call.key = True, None
            elif top:
                if ch not in _JSON_WS and not call.expect_key and self._is_args_key(call) and not call.args_kind:
                    call.args_kind = "other"
            elif reading_args:
                call.args.append(ch)
            i += 1
        self._take(buf[:i])
        self._buf = buf[i:]
        if call is not None:
            self._announce(events, call)

    def _scan_string(self, buf: str, i: int) -> int:
        """Consume string characters from ``buf[i]``; return the next index."""
        call = self._call
        top = len(self._stack) == 1
        sink = call.capture if top else (call.args if call.args_kind == "raw" and not call.args_done else None)
        n = len(buf)
        while i < n:
            if self._esc:
                self._esc = False
                if sink is not None:
                    sink.append(buf[i])
                i += 1
                continue
            match = _STRING_STOP.search(buf, i)
            j = match.start() if match else n
            if sink is not None and j > i:
                sink.append(buf[i:j])
            if match is None:
                return n
            if buf[j] == "\\":
                self._esc = True
                if sink is not None:
                    sink.append("\\")
                i = j + 1
                continue
            self._in_str = False  # closing quote
            if top:
                self._end_top_string(call)
            elif sink is not None:
                sink.append('"')
            return j + 1
        return n

    def _end_top_string(self, call: _Call) -> None:
        raw = "".join(call.capture or ())
        role, call.capture = call.capture_role, None
        try:
            value = json.loads('"' + raw + '"')
        except json.JSONDecodeError:
            value = None  # a bad escape: json.loads of the whole object reports it
        if role == "key":
            call.key = value
        elif role == "name" and value:
            call.name = value

    @staticmethod
    def _is_args_key(call: _Call) -> bool:
        # Only the first arguments value streams; a second one is caught by the final comparison.
        return call.key in ("arguments", "parameters") and not call.args_kind

    def _announce(self, events: list[Event], call: _Call) -> None:
        """Send the call's first chunk once its name is known, then argument text as it comes."""
        if call.index is None:
            if call.name is None:
                return
            call.index, call.id = self._next_index, new_call_id()
            self._next_index += 1
            events.append(ToolCallChunk(call.index, call.id, call.name, ""))
        if call.args_kind == "raw" and len(call.args) > call.sent:
            delta = "".join(call.args[call.sent:])
            call.args[call.sent:] = [delta]
            call.sent = len(call.args)
            if events and isinstance(events[-1], ToolCallChunk) and events[-1].index == call.index:
                last = events.pop()  # merge into the chunk this same feed produced
                events.append(ToolCallChunk(last.index, last.id, last.name, last.args_delta + delta))
            else:
                events.append(ToolCallChunk(call.index, None, None, delta))

    def _end_call(self, events: list[Event], raw: str, closed: bool) -> None:
        """A call object ended (closed, or cut off by the block's end): emit its last chunk or its error."""
        call, self._call = self._call, None
        self._block_calls += 1
        self._announce(events, call)
        error = None
        if not closed:
            error = "tool-call JSON is incomplete"
        else:
            try:
                name, args = _call_from_json(json.loads(raw))
            except json.JSONDecodeError as exc:
                error = f"invalid JSON: {exc}"
            except ValueError as exc:
                error = str(exc)
            except RecursionError:  # arguments nested deeper than Python's json reads (about 1,000 levels)
                error = "tool-call JSON is nested too deeply to read"
        if error is None:
            streamed = "".join(call.args) if call.args_kind == "raw" else ""
            if call.index is not None and name != call.name:
                error = f"conflicting names {call.name!r} and {name!r}"
            elif streamed and _loads_or_none(streamed) != args:
                error = "conflicting 'arguments' (a key given twice?)"
            else:
                if call.index is None:
                    call.index, call.id = self._next_index, new_call_id()
                    self._next_index += 1
                    events.append(ToolCallChunk(call.index, call.id, name, json.dumps(args, ensure_ascii=False)))
                elif not streamed:
                    events.append(ToolCallChunk(call.index, None, None, json.dumps(args, ensure_ascii=False)))
                return
        self._invalid_call(events, call, raw, error)

    def _invalid_call(self, events: list[Event], call: _Call | None, raw: str, error: str) -> None:
        if call is None or call.index is None:
            index, call_id = self._next_index, new_call_id()
            self._next_index += 1
        else:
            index, call_id = call.index, call.id
        if call is not None and call.args_kind == "raw" and call.args and not call.args_done:
            raw = "".join(call.args)  # cut off in its arguments: those, as their chunks were sent
        events.append(InvalidToolCall(index, call_id, call.name if call else None, raw, error))

    def _fail(self, buf: str, i: int, message: str) -> None:
        """A syntax error at ``buf[i]``: the rest of the block becomes one invalid call's raw text."""
        self._take(buf[:i])
        self._buf = buf[i:]
        start = self._call.start if self._call is not None else self._body_len
        self._error = (start, message)

    def _end_block(self, events: list[Event], closed: bool) -> None:
        body = "".join(self._body)
        if self._error is not None:
            start, message = self._error
            self._invalid_call(events, self._call, body[start:], message)
            self._call = None
        elif self._call is not None:
            self._end_call(events, body[self._call.start:], closed=False)
        elif not self._any_json:
            self._invalid_call(events, None, body, "empty tool-call block" if closed else
                               "tool-call block ended before any JSON")
        elif self._array and not self._array_closed and self._block_calls == 0:
            self._invalid_call(events, None, body, "tool-call JSON is incomplete")
        self._state = "text"
        self._body, self._body_len = [], 0


def _loads_or_none(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


def _partial_marker_suffix(text: str, markers: Iterable[str]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of one of ``markers``."""
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best


__all__ = [
    "CALL_MARKERS",
    "Citations",
    "ContentDelta",
    "Event",
    "InvalidToolCall",
    "ParsedOutput",
    "StreamingToolCallParser",
    "ToolCallChunk",
    "ToolCallParser",
    "detect_call_format",
    "new_call_id",
    "parse_output",
]
