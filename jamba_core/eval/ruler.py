"""RULER-style long-context tasks over a Moby-Dick haystack, and their evaluation against any chat model.

The tasks follow NVIDIA's RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?", github.com/NVIDIA/RULER, `scripts/data/synthetic/niah.py` and
`variable_tracking.py`): needles-in-a-haystack with one needle, with distractor keys, with several values
for one key, and variable tracking through chains of assignments. Unlike RULER's essay/noise haystacks,
the haystack here is a contiguous slice of Moby-Dick (../shared/data/moby-dick.txt), and the needle keys
are pairs of the book's own words, split by a stable hash so that training keys never appear in tests.
"""

from __future__ import annotations

import bisect
import random
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")
SPLITS = ("train", "test")

# RULER's templates (scripts/data/synthetic/constants.py), niah and variable_tracking.
_NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                     "I will quiz you about the numbers afterwards.")
_NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
_NIAH_QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
_NIAH_QUESTION_ALL = "What are all the special magic numbers for {key} mentioned in the provided text?"
_VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
_VT_QUESTION = "Find all variables that are assigned the value {value} in the text above."
# RULER appends an answer prefix that restates the question; the training targets are that prefix and
# the answer, so the reply repeats the needle's own words before each value
_NIAH_ANSWER = "The special magic number for {key} is: {value}."
_NIAH_ANSWER_ALL = "The special magic numbers for {key} are: {values}."
_VT_ANSWER = "The variables assigned the value {value} are: {names}."

_HEADROOM = 40         # tokens left under `length` for the chat template and the reply
_NEEDLES = 4           # needles per multi-key / multi-value sample; also the variables per VT chain
_MIN_WORD_COUNT = 5    # a key word occurs at least this often in the book
_BOUNDARY = re.compile(r"(?<=[.!?]) |\n")  # a needle goes right after a sentence end or a line break


@dataclass
class Sample:
    """One evaluation (or training) example.

    Attributes:
        task: one of `TASKS`.
        prompt: the full user message: instruction line, haystack with needles, question line.
        answers: every string that must appear in the model's reply.
        length: the requested context length in tokens; the prompt is 0.9-1.0 of it.
        depth: 0..100, percent position of the queried needle in the haystack.
        target: the ideal reply (the training target): RULER's answer prefix, which restates the
            question, with the answers.
    """

    task: str
    prompt: str
    answers: list[str]
    length: int
    depth: float
    target: str


class Haystack:
    """Moby-Dick tokenized once with a given tokenizer, so that slices of N tokens are cut quickly.

    Args:
        tokenizer: any Hugging Face tokenizer (`__call__`, `encode`, `decode`).
        text: the haystack text; default `shared_dir()/data/moby-dick.txt`.

    Attributes:
        text: the book.
        ids: its token ids, without special tokens (about 350K for a 4K-vocabulary BPE).
        words: sorted lowercase words of 4-9 letters occurring at least 5 times (the key vocabulary).
    """

    def __init__(self, tokenizer, text: str | None = None):
        if text is None:
            from jamba_core.tokenizer import shared_dir

            book = shared_dir() / "data" / "moby-dick.txt"
            if not book.is_file():  # a checkout without the project's shared data folder beside it
                raise FileNotFoundError(f"the default haystack {book} is missing: set JAMBA_LOCAL_SHARED to the folder "
                                        "holding data/moby-dick.txt, or give a text (jamba-local eval --haystack FILE)")
            text = book.read_text(encoding="utf-8")
        self.tokenizer, self.text = tokenizer, text
        # Paragraph by paragraph in one batch: fast, and no "longer than model_max_length" warning.
        paragraphs = re.split(r"(?<=\n\n)", text)
        self.ids = [i for ids in tokenizer(paragraphs, add_special_tokens=False)["input_ids"] for i in ids]
        counts = Counter(re.findall(r"[A-Za-z]+", text))
        self.words = sorted(w for w, n in counts.items() if n >= _MIN_WORD_COUNT and w.islower() and 4 <= len(w) <= 9)

    def cut(self, n_tokens: int, offset: int) -> str:
        """About `n_tokens` tokens of the book from token `offset` on, wrapping to its start, whole words only."""
        pieces, start = [], offset % len(self.ids)
        while n_tokens > 0:
            take = min(n_tokens, len(self.ids) - start)
            pieces.append(self.tokenizer.decode(self.ids[start:start + take]))
            n_tokens, start = n_tokens - take, 0
        text = "\n".join(pieces)
        return re.sub(r"^\S*\s+|\s+\S*$", "", text)  # drop the word each end may have split

    def key_words(self, split: str) -> list[str]:
        """The words keys are made of: even CRC-32 for "train", odd for "test", so the two never share one."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        parity = 0 if split == "train" else 1
        return [w for w in self.words if zlib.crc32(w.encode()) % 2 == parity]

    def count(self, text: str) -> int:
        """Tokens in `text` as a prompt (with the tokenizer's special tokens, e.g. BOS)."""
        return len(self.tokenizer.encode(text))


def _insert(text: str, needles: list[tuple[float, str]]) -> str:
    """`text` with each (depth 0..100, sentence) put at the sentence or line boundary nearest that depth.

    Needles at the same boundary keep their list order.
    """
    bounds = [0, *(m.end() for m in _BOUNDARY.finditer(text)), len(text)]
    placed = []
    for order, (depth, sentence) in enumerate(needles):
        target = depth / 100 * len(text)
        i = bisect.bisect_left(bounds, target)
        pos = min(bounds[max(0, i - 1):i + 1], key=lambda b: abs(b - target))
        placed.append((pos, order, sentence))
    pieces, prev = [], 0
    for pos, _, sentence in sorted(placed):
        pieces += [text[prev:pos], sentence]
        prev = pos
    pieces.append(text[prev:])
    out = ""
    for piece in filter(None, pieces):  # a space between pieces unless whitespace is already there
        out += piece if not out or out[-1].isspace() or piece[0].isspace() else " " + piece
    return out


def _spread(depth: float, n: int) -> list[float]:
    """`n` depths from `depth` towards 100, evenly: the chain or value list reads in order."""
    return [depth + i * (100 - depth) / n for i in range(n)]


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _distinct(draw: Callable[[], str], n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        if (x := draw()) not in out:
            out.append(x)
    return out


def _parts(task: str, depth: float, rng: random.Random, words: list[str]):
    """(instruction, [(depth, sentence)], question, answers, target) of one sample, before the haystack is cut."""
    def key():
        return "-".join(rng.sample(words, 2))

    if task in ("niah_single", "niah_multikey", "niah_multivalue"):
        n = 1 if task == "niah_single" else _NEEDLES
        values = _distinct(lambda: _number(rng, 7), n)
        if task == "niah_multivalue":
            k = key()
            needles = [(d, _NIAH_NEEDLE.format(key=k, value=v)) for d, v in zip(_spread(depth, n), values)]
            target = _NIAH_ANSWER_ALL.format(key=k, values=", ".join(values))
            return _NIAH_INSTRUCTION, needles, _NIAH_QUESTION_ALL.format(key=k), values, target
        keys = _distinct(key, n)  # keys[0] is queried; the others are distractors at random depths
        depths = [depth] + [rng.uniform(0, 100) for _ in range(n - 1)]
        needles = [(d, _NIAH_NEEDLE.format(key=k, value=v)) for d, k, v in zip(depths, keys, values)]
        target = _NIAH_ANSWER.format(key=keys[0], value=values[0])
        return _NIAH_INSTRUCTION, needles, _NIAH_QUESTION.format(key=keys[0]), values[:1], target
    if task == "variable_tracking":
        names = _distinct(lambda: "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5)), 2 * _NEEDLES)
        value, other = _distinct(lambda: _number(rng, 5), 2)

        def chain(vars_, v):  # RULER's VT: "VAR A = 12345", then "VAR B = VAR A", ...
            return [f"VAR {vars_[0]} = {v}."] + [f"VAR {b} = VAR {a}." for a, b in zip(vars_, vars_[1:])]

        queried, distractor = names[:_NEEDLES], names[_NEEDLES:]
        needles = list(zip(_spread(depth, _NEEDLES), chain(queried, value)))
        needles += list(zip(sorted(rng.uniform(0, 100) for _ in range(_NEEDLES)), chain(distractor, other)))
        target = _VT_ANSWER.format(value=value, names=", ".join(f"VAR {v}" for v in queried))
        return _VT_INSTRUCTION, needles, _VT_QUESTION.format(value=value), queried, target
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def make_sample(task: str, length: int, depth: float, seed: int, haystack: Haystack, split: str = "test") -> Sample:
    """One RULER-style sample whose prompt is 0.9*`length` to `length` tokens (minus a reply headroom).

    Args:
        task: one of `TASKS`.
        length: context length in tokens, 256..262144; the prompt leaves min(40, length/16) tokens
            for the chat template and the reply.
        depth: 0..100, where the queried needle (or the first value / chain link) goes.
        seed: picks the book offset, keys, values and distractor depths; the same seed gives the same
            ones at every length and depth, so cells of a sweep differ only in what they vary.
        haystack: the tokenized book (its tokenizer sets the token counts).
        split: "train" or "test": which half of the key vocabulary the keys come from.

    Returns:
        The same `Sample` for the same arguments.

    Raises:
        ValueError: an unknown task or split, a depth outside 0..100, or a length too short for the task's
            fixed text (variable tracking needs more than 256 tokens with some tokenizers).
    """
    if not 0 <= depth <= 100:
        raise ValueError(f"depth must be within 0..100, got {depth}")
    rng = random.Random(f"{split}:{task}:{seed}")
    instruction, needles, question, answers, target = _parts(task, depth, rng, haystack.key_words(split))
    offset = rng.randrange(len(haystack.ids))

    def render(n_tokens: int) -> str:
        context = _insert(haystack.cut(n_tokens, offset) if n_tokens > 0 else "", needles)
        return f"{instruction}\n{context}\n{question}"

    budget = length - min(_HEADROOM, length // 16)
    n = budget - haystack.count(render(0))
    for _ in range(8):  # token counts of the parts add up only roughly: correct until within budget
        prompt = render(n)
        excess = haystack.count(prompt) - budget
        if excess <= 0:
            break
        n -= excess
    else:
        raise ValueError(f"could not fit a {task} prompt into {length} tokens: its question and needles alone take about "
                         f"{haystack.count(render(0))} tokens, and {length - budget} are kept for the chat template and "
                         f"the reply (room: {budget}); use a longer length")
    return Sample(task=task, prompt=prompt, answers=list(answers), length=length, depth=float(depth),
                  target=target)


def score(reply: str, answers: list[str]) -> float:
    """Fraction of `answers` found in `reply` (case-sensitive substring: RULER's `string_match_all`)."""
    return sum(a in reply for a in answers) / len(answers)


def _describe(chat_model) -> dict:
    params = {k: v for k, v in getattr(chat_model, "_identifying_params", {}).items()
              if isinstance(v, (str, int, float, bool, type(None)))}
    return {"class": type(chat_model).__name__, "llm_type": getattr(chat_model, "_llm_type", None), **params}


def evaluate(chat_model, tasks, lengths, depths, samples_per_cell: int, tokenizer, seed: int = 0,
             max_new_tokens: int | None = 32, split: str = "test", haystack: Haystack | None = None,
             progress: Callable[[dict], None] | None = None) -> dict:
    """Accuracy of any LangChain chat model on every (task, length, depth) cell.

    Each sample is sent as one `HumanMessage`; its score is the fraction of its answers in the reply's
    text (`reply_text`: a reply in content blocks counts its text blocks only, not reasoning).
    Every sample of every cell has its own seed (keys, values and haystack offset), derived from
    `seed`, the cell and the sample's index, so no two cells repeat a needle.

    Args:
        chat_model: any `BaseChatModel` (greedy decoding is the caller's choice, e.g. temperature 0).
        tasks, lengths, depths: the grid; lengths in tokens, depths in percent.
        samples_per_cell: samples per cell.
        tokenizer: cuts the haystack and counts prompt tokens (the model's own, for honest lengths).
        max_new_tokens: passed to `invoke` as `max_tokens` (LangChain's common name); None passes nothing.
        split: key vocabulary, "test" unless you mean to score on training keys.
        haystack: a `Haystack` already built with `tokenizer` (saves tokenizing the book again).
        progress: called with each finished cell's dict.

    Returns:
        {"model", "split", "seed", "max_new_tokens", "tasks", "lengths", "depths", "samples_per_cell",
         "cells": [{"task", "length", "depth", "accuracy", "latency_s", "prompt_tokens", "samples": [...]}],
         "means": [{"task", "length", "accuracy"}]}; accuracy in 0..1, latency in seconds per sample.

    Raises:
        ValueError: an empty grid (no task, length or depth, or fewer than 1 sample per cell), or what
            `make_sample` raises for a cell.
        Whatever the model raises for a sample ends the run with that exception; the cells finished before
        it (those passed to ``progress``) make a partial result with `summarize`, as ``jamba-local eval``
        writes on an error or Ctrl-C.
    """
    from langchain_core.messages import HumanMessage

    if samples_per_cell < 1 or not tasks or not lengths or not depths:
        raise ValueError(f"nothing to evaluate: {samples_per_cell} samples per cell over {len(tasks)} tasks, {len(lengths)} "
                         f"lengths and {len(depths)} depths (each must be at least 1)")
    haystack = haystack or Haystack(tokenizer)
    def sample_seed(task, length, depth, i):  # the depth's value, not its type: 50 and 50.0 (the CLI's) draw alike
        return zlib.crc32(f"{seed}:{task}:{length}:{float(depth):g}:{i}".encode())
    kwargs = {} if max_new_tokens is None else {"max_tokens": max_new_tokens}
    cells = []
    for task in tasks:
        for length in lengths:
            for depth in depths:
                runs = []
                for i in range(samples_per_cell):
                    s = sample_seed(task, length, depth, i)
                    sample = make_sample(task, length, depth, s, haystack, split)
                    start = time.perf_counter()
                    reply = reply_text(chat_model.invoke([HumanMessage(sample.prompt)], **kwargs))
                    runs.append({"seed": s, "score": score(reply, sample.answers), "answers": sample.answers,
                                 "reply": reply, "latency_s": time.perf_counter() - start,
                                 "prompt_tokens": haystack.count(sample.prompt)})
                cell = {"task": task, "length": length, "depth": depth, "accuracy": _mean(r["score"] for r in runs),
                        "latency_s": _mean(r["latency_s"] for r in runs),
                        "prompt_tokens": _mean(r["prompt_tokens"] for r in runs), "samples": runs}
                cells.append(cell)
                if progress:
                    progress(cell)
    return summarize(chat_model, cells, tasks, lengths, depths, samples_per_cell, seed=seed, max_new_tokens=max_new_tokens,
                     split=split)


def summarize(chat_model, cells: list[dict], tasks, lengths, depths, samples_per_cell: int, seed: int = 0,
              max_new_tokens: int | None = 32, split: str = "test", error: str | None = None) -> dict:
    """`evaluate`'s result for ``cells`` (the dicts it passes to ``progress``), the means over the cells
    present; the grid may be unfinished (an interrupted run: ``error`` says why, and the result gets
    ``"partial": True`` and ``"error"``)."""
    means = [{"task": t, "length": n, "accuracy": _mean(mine)}
             for t in tasks for n in lengths
             if (mine := [c["accuracy"] for c in cells if (c["task"], c["length"]) == (t, n)])]
    result = {"model": _describe(chat_model), "split": split, "seed": seed, "max_new_tokens": max_new_tokens,
              "tasks": list(tasks), "lengths": list(lengths), "depths": list(depths),
              "samples_per_cell": samples_per_cell, "cells": list(cells), "means": means}
    if error is not None:
        result.update(partial=True, error=error)
    return result


def reply_text(message) -> str:
    """The answer text of a chat model's reply: its content when a string, else its text blocks joined
    (plain strings and ``{"type": "text"}`` blocks; reasoning, tool-use and citation blocks left out, as
    LangChain's ``AIMessage.text`` does)."""
    content = message.content
    if isinstance(content, str):
        return content
    return "".join(block if isinstance(block, str) else block.get("text") or "" for block in content
                   if isinstance(block, str) or isinstance(block, dict) and block.get("type") == "text")


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)
