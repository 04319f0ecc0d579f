"""A reasoning model's thinking, split from its answer: ``<think> ... </think>`` then the answer.

Jamba Reasoning 3B thinks between ``<think>`` and ``</think>`` before it answers (its chat template asks it to;
a template may also open the ``<think>`` itself at the end of the prompt, as DeepSeek-R1's and Qwen3's do). The
thinking is not the answer: vLLM's reasoning parsers return it apart (``reasoning_content``), and a tool-call
marker written while thinking is no call. `ReasoningSplitter` does that split on streamed text: any splitting of
the output gives the same reasoning and answer, joined.

Rules:
- Output that starts (after whitespace) with ``<think>``, or any output when the prompt already opened it, is
  reasoning up to the first ``</think>``; the rest is the answer. Output that starts otherwise is all answer.
- The reasoning is stripped of surrounding whitespace; streamed, its leading whitespace is dropped and a trailing
  whitespace run is held back until more reasoning follows, so the deltas join to the stripped text.
- Thinking never closed (the token budget ran out) is all reasoning; the answer is then empty.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningDelta:
    """Reasoning text, in order (a `jamba_core.chat.api.chat_stream` event); the deltas join to
    `ChatResult.reasoning`."""

    text: str


def is_reasoning_template(template) -> bool:
    """Whether a chat template (a string, or transformers' dict of named templates) writes ``<think>``."""
    if isinstance(template, dict):
        return any(is_reasoning_template(t) for t in template.values())
    return isinstance(template, str) and THINK_OPEN in template


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt ends inside an open ``<think>`` (the template started the thinking)."""
    return prompt.rstrip().endswith(THINK_OPEN)


class ReasoningSplitter:
    """Incremental split: `feed` text deltas, then `finish`; each returns ``[("reasoning" | "answer", text)]``.

    ``opened``: the prompt already opened ``<think>`` (`prompt_opens_thinking`)."""

    def __init__(self, opened: bool = False):
        self._state = "reasoning" if opened else "start"  # "start" | "reasoning" | "answer"
        self._buf = ""  # held back: a possible marker prefix, or whitespace
        self._started = False  # reasoning text seen (leading whitespace is dropped)
        self.reasoning: list[str] = []

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self._buf += delta
        out: list[tuple[str, str]] = []
        if self._state == "start":
            head = self._buf.lstrip()
            if head.startswith(THINK_OPEN):
                self._state, self._buf = "reasoning", head[len(THINK_OPEN):]
            elif THINK_OPEN.startswith(head):
                return out  # whitespace or a prefix of the marker: wait
            else:
                self._state = "answer"
        if self._state == "reasoning":
            end = self._buf.find(THINK_CLOSE)
            if end >= 0:
                self._think(self._buf[:end], out, final=True)
                self._state, self._buf = "answer", self._buf[end + len(THINK_CLOSE):]
            else:
                keep = _marker_prefix_len(self._buf, THINK_CLOSE)
                text, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                body = text.rstrip()
                self._think(body, out, final=False)
                self._buf = text[len(body):] + self._buf  # trailing whitespace waits for more reasoning
        if self._state == "answer" and self._buf:
            out.append(("answer", self._buf))
            self._buf = ""
        return out

    def finish(self) -> list[tuple[str, str]]:
        """End of output: held text goes where it stands (an unclosed thinking's tail is reasoning)."""
        out: list[tuple[str, str]] = []
        if self._state == "reasoning":
            self._think(self._buf.rstrip(), out, final=True)
        elif self._buf:
            out.append(("answer", self._buf))
        self._buf = ""
        return out

    def _think(self, text: str, out: list, final: bool) -> None:
        if not self._started:
            text = text.lstrip()
        if final:
            text = text.rstrip()
        if text:
            self._started = True
            self.reasoning.append(text)
            out.append(("reasoning", text))


def _marker_prefix_len(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def split_reasoning(text: str, opened: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a whole output, as `ReasoningSplitter` streams them."""
    splitter = ReasoningSplitter(opened)
    parts = splitter.feed(text) + splitter.finish()
    return "".join(t for k, t in parts if k == "reasoning"), "".join(t for k, t in parts if k == "answer")
