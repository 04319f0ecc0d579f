"""Synthetic chat data for the small trained Jamba, rendered with the real template (`render_chat`).

Four task families, each a conversation whose assistant turns are the training targets:

- needle retrieval over real-text haystacks (`jamba_core.eval.ruler`'s tasks, ``split="train"`` keys);
- recall: many needles in a short haystack and a question about several of them, so that every sample
  has many answer tokens that need a lookup (multi-query associative recall, Arora et al. 2023, "Zoology",
  the task that separates attention from pure state-space layers);
- tool calls: random tools (name, description, JSON-schema parameters) in the system message, a user
  request that names the arguments, the call in the checkpoint's ``<tool_calls>`` format, the tool's
  result, then an answer that quotes it;
- JSON extraction: a record described in prose, a JSON schema as the response format (JSON mode), the
  record as JSON.

Words come from Moby-Dick's vocabulary; ``split`` ("train" / "test") keeps tool names, argument values
and record values of the two splits disjoint (a stable hash of the word decides), so evaluation uses
names and values never seen in training.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from ..chat.render import render_chat
from ..eval import ruler
from ..tokenizer import shared_dir

VERBS = ("get", "find", "lookup", "fetch", "compute", "convert", "search", "check", "create", "send", "list", "count",
         "update", "book", "cancel", "translate", "measure", "track", "score", "rate")
PARAM_NAMES = ("input", "query", "city", "location", "name", "id", "amount", "unit", "date", "count", "text", "limit",
               "language", "currency", "user", "item", "size", "color", "price", "code", "value", "topic", "level")
FIELD_NAMES = ("name", "age", "city", "email", "score", "active", "color", "count", "title", "country", "year",
               "price", "rank", "ship", "captain", "crew", "weight", "owner", "status", "port")


@lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    text = (shared_dir() / "data" / "moby-dick.txt").read_text(encoding="utf-8")
    counts = Counter(re.findall(r"\b[a-z]{4,9}\b", text))
    return tuple(sorted(w for w, n in counts.items() if n >= 5))


@lru_cache(maxsize=2)
def words(split: str) -> tuple[str, ...]:
    """Moby-Dick words of 4-9 letters seen >= 5 times whose crc32 parity matches the split (train even)."""
    parity = {"train": 0, "test": 1}[split]
    return tuple(w for w in _vocabulary() if zlib.crc32(w.encode()) % 2 == parity)


@dataclass
class Conversation:
    task: str
    messages: list[dict]
    tools: list[dict] | None = None
    response_format: dict | None = None


# -- tool calls ------------------------------------------------------------------------------------
def _value(kind: str, rng: random.Random, vocab, enum=None):
    if kind == "integer":
        return rng.randint(0, 999)
    if kind == "number":
        return round(rng.uniform(0, 1000), rng.choice((1, 2)))
    if kind == "boolean":
        return rng.random() < 0.5
    if enum:
        return rng.choice(enum)
    return " ".join(rng.choice(vocab) for _ in range(rng.choice((1, 1, 2)))).capitalize() if rng.random() < 0.3 else rng.choice(vocab)


def _say(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def random_tool(rng: random.Random, vocab) -> dict:
    """An OpenAI-style function tool with 1-3 typed parameters, all required."""
    noun = rng.choice(vocab)
    name = rng.choice((f"{rng.choice(VERBS)}_{noun}", noun, f"{noun}_{rng.choice(vocab)}"))
    props, n = {}, rng.choice((1, 1, 2, 2, 3))
    while len(props) < n:
        pname = rng.choice(PARAM_NAMES) if rng.random() < 0.6 else rng.choice(vocab)
        kind = rng.choice(("string", "string", "integer", "number", "boolean", "enum"))
        spec = {"type": "string" if kind == "enum" else kind, "description": f"The {pname}."}
        if kind == "enum":
            spec["enum"] = rng.sample(vocab, 3)
        props[pname] = spec
    return {"type": "function", "function": {"name": name, "description": f"{rng.choice(VERBS).capitalize()} the {noun}.",
            "parameters": {"type": "object", "properties": props, "required": list(props)}}}


def _request(name: str, args: dict, rng: random.Random) -> str:
    pairs = [(k, _say(v)) for k, v in args.items()]
    if len(pairs) == 1 and rng.random() < 0.3:
        return rng.choice((f"What is the value of {name}({pairs[0][1]})? Use the tool.",
                           f"Use the {name} tool on {pairs[0][1]}."))
    listing = rng.choice((
        ", ".join(f"{k}={v}" for k, v in pairs),
        " and ".join(f"{k} {v}" for k, v in pairs),
        ", ".join(f"{k} is {v}" for k, v in pairs),
        ", ".join(f"{k}: {v}" for k, v in pairs),
    ))
    return rng.choice((f"Call {name} with {listing}.", f"Use the {name} tool with {listing}.",
                       f"Please run {name} for {listing}.", f"I need {name}: {listing}"))


def tool_call(rng: random.Random, split: str = "train", rounds: int = 1) -> Conversation:
    """1-3 random tools, then ``rounds`` exchanges of: a request naming one tool and its arguments, the
    call, the tool's result, an answer quoting it (more rounds: more call tokens per sample). The first
    round draws from ``rng`` the same way whatever ``rounds`` is, so evaluation samples stay fixed."""
    vocab = words(split)
    tools = [random_tool(rng, vocab) for _ in range(rng.choice((1, 2, 3)))]
    messages = []
    for r in range(rounds):
        chosen = rng.choice(tools)["function"]
        args = {k: _value("enum" if "enum" in spec else spec["type"], rng, vocab, spec.get("enum"))
                for k, spec in chosen["parameters"]["properties"].items()}
        result = rng.choice((str(rng.randint(0, 99999)), f"{rng.choice(vocab)} {rng.randint(1, 999)}", rng.choice(vocab)))
        if r == 0 and rng.random() < 0.3:
            messages.append({"role": "system", "content": "You are a helpful assistant."})
        messages += [
            {"role": "user", "content": _request(chosen["name"], args, rng)},
            {"role": "assistant", "content": "", "tool_calls": [{"id": f"call_{r}", "type": "function",
                                                                 "function": {"name": chosen["name"], "arguments": args}}]},
            {"role": "tool", "tool_call_id": f"call_{r}", "content": result},
            {"role": "assistant", "content": rng.choice((f"The result is {result}.", f"{chosen['name']} returned {result}.", result))},
        ]
    return Conversation("tool_call", messages, tools=tools)


# -- JSON extraction -------------------------------------------------------------------------------
def json_extraction(rng: random.Random, split: str = "train") -> Conversation:
    vocab = words(split)
    n = rng.choice((1, 2, 3, 4))
    names = rng.sample(FIELD_NAMES, n) if rng.random() < 0.7 else rng.sample(vocab, n)
    kinds = {k: rng.choice(("string", "string", "integer", "number", "boolean")) for k in names}
    record = {k: _value(kinds[k], rng, vocab) for k in names}
    facts = [rng.choice((f"The {k} is {_say(v)}.", f"Its {k} is {_say(v)}.", f"{k}: {_say(v)}."))
             for k, v in record.items()]
    rng.shuffle(facts)
    schema = {"title": rng.choice(("Record", "Info", "Entry", rng.choice(vocab).capitalize())), "type": "object",
              "properties": {k: {"type": kinds[k]} for k in names}, "required": names}
    messages = [{"role": "user", "content": rng.choice(("Extract the fields from this text: ", "", "Text: ")) + " ".join(facts)},
                {"role": "assistant", "content": json.dumps(record)}]
    return Conversation("json", messages, response_format={"type": "json_schema", "json_schema": {"name": schema["title"], "schema": schema}})


# -- copying ---------------------------------------------------------------------------------------
def repeat(rng: random.Random, max_items: int = 40, split: str | None = None) -> Conversation:
    """A random sequence of book words and numbers to repeat verbatim: every answer token is a copy of
    the token that followed the same one in the prompt (the induction pattern, Olsson et al. 2022), the
    mechanism that the lookups of the other tasks build on, here with the densest possible signal.
    ``max_items``: the longest sequence, in words and numbers (at least 4). ``split`` None draws from
    the whole vocabulary: copying is generic, like the book text every haystack already shows, and a
    copy task on the training split alone left the test split's words uncopied (a tool result in a test
    word was quoted in 52% of answers, a training-split one in 95%); the tool names, arguments, needle
    keys and record values of the other tasks keep to their split."""
    vocab = _vocabulary() if split is None else words(split)
    items = [str(rng.randint(0, 10 ** rng.randint(1, 7))) if rng.random() < 0.3 else rng.choice(vocab)
             for _ in range(rng.randint(4, max_items))]
    text = rng.choice((" ", ", ", " ")).join(items)
    ask = rng.choice(("Repeat this exactly: ", "Copy the following text: ", "Say it back: ", ""))
    return Conversation("repeat", [{"role": "user", "content": ask + text}, {"role": "assistant", "content": text}])


def spell(rng: random.Random, max_items: int = 10) -> Conversation:
    """Book words (the whole vocabulary; some capitalised, some joined by ``_`` as tool names are) listed
    in prose, answered as a JSON list of strings. A word's tokens after a space differ from its tokens
    inside quotes (`` hatchway`` is ``Ġhat ch way``, ``"hatchway"`` is ``" h atch way "``), so a tool name
    or argument quoted from a request is a re-spelling, not a token copy: the trained checkpoint's tool
    calls failed on exactly that for held-out words (``cheering`` -> ``weering``). This task trains the
    mapping for every word; the tool tasks' names and values still keep to their split."""
    vocab = _vocabulary()
    items = []
    for _ in range(rng.randint(1, max_items)):
        form = rng.random()
        w = rng.choice(vocab)
        items.append(f"{w}_{rng.choice(vocab)}" if form < 0.3 else w.capitalize() if form < 0.4 else
                     f"{w.capitalize()} {rng.choice(vocab)}" if form < 0.45 else w)
    ask = rng.choice(("Write these as a JSON list of strings: ", "Quote each word: ", "JSON list: ", "Make a list of "))
    text = rng.choice((", ", "; ", " and ")).join(items)
    return Conversation("spell", [{"role": "user", "content": ask + text}, {"role": "assistant", "content": json.dumps(items)}])


# -- needles ---------------------------------------------------------------------------------------
def needle(rng: random.Random, haystack, length: int, split: str = "train") -> Conversation:
    task = rng.choices(ruler.TASKS, weights=(4, 2, 2, 1))[0]
    sample = ruler.make_sample(task, length, rng.uniform(0, 100), rng.randrange(2**31), haystack, split=split)
    return Conversation(task, [{"role": "user", "content": sample.prompt}, {"role": "assistant", "content": sample.target}])


def recall(rng: random.Random, haystack, context: int = 128, split: str = "train") -> Conversation:
    """2-12 needles in the RULER format spread through ``context`` tokens of the book (0 for needles
    alone), then a question about most of their keys. The answer restates each needle, in the order
    asked, as RULER's answer prefix does (``The special magic number for K is: V.``), so every value
    follows the same words as in its needle: one lookup (an induction copy) per value, many per sample.
    This is the dense form of multi-query associative recall (Arora et al. 2023, "Zoology"): with one
    answer per sample, or answers worded unlike the needles, earlier runs learned no lookup at all."""
    words = haystack.key_words(split)
    n = rng.randint(2, 12)
    keys = list(dict.fromkeys("-".join(rng.sample(words, 2)) for _ in range(n)))
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    pieces = haystack.cut(context, rng.randrange(len(haystack.ids))).split(". ") if context > 0 else []
    for k, v in zip(keys, values):
        pieces.insert(rng.randrange(len(pieces) + 1), ruler._NIAH_NEEDLE.format(key=k, value=v).rstrip("."))
    asked = rng.sample(range(len(keys)), rng.randint(max(1, len(keys) // 2), len(keys)))
    question = (ruler._NIAH_QUESTION.format(key=keys[asked[0]]) if len(asked) == 1 else
                f"What are the special magic numbers for {', '.join(keys[i] for i in asked)} mentioned in the provided text?")
    prompt = ruler._NIAH_INSTRUCTION + "\n" + ". ".join(pieces) + ".\n" + question
    answer = " ".join(ruler._NIAH_ANSWER.format(key=keys[i], value=values[i]) for i in asked)
    return Conversation("recall", [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])


# -- tokens ----------------------------------------------------------------------------------------
def encode(tokenizer, conv: Conversation) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and a 0/1 mask marking the assistant turns' tokens (content
    and closing ``<|eom|>``): the positions whose next-token prediction is trained."""
    kw = dict(tools=conv.tools, response_format=conv.response_format)
    ids = tokenizer.encode(render_chat(tokenizer, conv.messages, add_generation_prompt=False, **kw), add_special_tokens=False)
    mask = [0] * len(ids)
    for i, m in enumerate(conv.messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.encode(render_chat(tokenizer, conv.messages[:i], add_generation_prompt=True, **kw), add_special_tokens=False))
        end = len(tokenizer.encode(render_chat(tokenizer, conv.messages[: i + 1], add_generation_prompt=False, **kw), add_special_tokens=False))
        for t in range(start, end):
            mask[t] = 1
    return ids, mask
