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
# the share of book-word tool parameters named by `PARAM_NAMES` (`random_tool`): the held-out evaluation draws with it
COMMON_KEYS = 0.6
# the share of one-argument requests that name no key (`_request`): the held-out evaluation draws with it
KEYLESS = 0.3
# the share of requests with two or more arguments that name them in a shuffled order (the schema's as likely
# as any; the call follows the request's order): 0 draws nothing, so the held-out evaluation's samples stay as drawn;
# training draws with `trainer.SHUFFLED_KEYS`
SHUFFLED_KEYS = 0.0
# the share of book-word tool parameters made integers before `random_tool`'s usual draw of a type (a sixth of
# which is integer already): 0 draws nothing, so the held-out evaluation's samples stay as drawn; training draws
# with `trainer.INTEGERS`
INTEGERS = 0.0
# Tools as applications name them (``get_weather``, ``multiply``, ``greeting_generator``): common English
# verbs, nouns and adjectives, for `tool_call`'s ``style="common"``, so the checkpoint meets tool names and
# requests worded the way LangChain's and LlamaIndex's suites and users word them, not only book words.
COMMON_VERBS = VERBS + ("add", "subtract", "divide", "calculate", "generate", "convert", "summarize", "schedule", "order",
                        "play", "open", "delete", "read", "write", "lookup", "predict", "recommend", "validate", "format")
COMMON_NOUNS = ("weather", "time", "stock", "price", "news", "order", "customer", "account", "flight", "hotel", "email",
                "message", "file", "note", "event", "meeting", "task", "reminder", "temperature", "distance", "recipe",
                "movie", "song", "joke", "quote", "greeting", "translation", "word", "number", "sum", "product",
                "invoice", "payment", "balance", "rate", "team", "player", "game", "city", "country", "population",
                "address", "route", "traffic", "calendar", "contact", "photo", "document", "report", "summary", "ticket",
                "issue", "record", "table", "discount", "cart", "shipment", "package", "restaurant", "review", "rating",
                "definition", "fact", "function", "forecast", "exchange", "timezone", "holiday", "user", "profile",
                "password", "image", "color", "language", "score", "square", "power", "factorial", "average", "total")
COMMON_ADJECTIVES = ("magic", "secret", "random", "current", "local", "daily", "latest", "special", "simple", "quick",
                     "public", "global", "unicode", "weekly", "best", "new")
COMMON_AGENTS = ("generator", "calculator", "finder", "checker", "converter", "tracker", "counter", "fetcher", "helper",
                 "formatter", "planner", "search")
# Tool names the demo, the notebooks and the integration suites call: never generated, so that those runs
# meet them as unseen names (their words still occur in other combinations).
HELD_OUT_TOOL_NAMES = frozenset({"magic_function", "get_weather", "get_population", "unicode_customer",
                                 "greeting_generator", "multiply", "add", "ticker"})
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
    documents: list[dict] | None = None


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


def random_tool(rng: random.Random, vocab, common_keys: float = COMMON_KEYS, integers: float = INTEGERS,
                params: int | None = None) -> dict:
    """An OpenAI-style function tool with 1-3 typed parameters (``params`` of them when given), all
    required; each parameter's name is one of `PARAM_NAMES` with probability ``common_keys``, else a word
    of ``vocab``; each parameter is an integer with probability ``integers``, else of a type drawn from
    string (twice as likely as the others), integer, number, boolean and enum (0 draws nothing for it, so
    the samples stay as drawn)."""
    noun = rng.choice(vocab)
    name = rng.choice((f"{rng.choice(VERBS)}_{noun}", noun, f"{noun}_{rng.choice(vocab)}"))
    props, n = {}, params or rng.choice((1, 1, 2, 2, 3))
    while len(props) < n:
        pname = rng.choice(PARAM_NAMES) if rng.random() < common_keys else rng.choice(vocab)
        kind = "integer" if integers and rng.random() < integers else rng.choice(("string", "string", "integer", "number", "boolean", "enum"))
        spec = {"type": "string" if kind == "enum" else kind, "description": f"The {pname}."}
        if kind == "enum":
            spec["enum"] = rng.sample(vocab, 3)
        props[pname] = spec
    return {"type": "function", "function": {"name": name, "description": f"{rng.choice(VERBS).capitalize()} the {noun}.",
            "parameters": {"type": "object", "properties": props, "required": list(props)}}}


def _common_value(kind: str, rng: random.Random, vocab, enum=None):
    """Arguments as users give them: small numbers, capitalised names, places (``Nantucket, MA``) and
    text in other scripts (CJK, kana, accented Latin: random characters, nothing to memorise)."""
    if kind == "integer":
        return rng.choice((rng.randint(0, 9), rng.randint(0, 9), rng.randint(10, 99), rng.randint(100, 9999)))
    if kind in ("number", "boolean") or enum:
        return _value(kind, rng, vocab, enum)
    form = rng.random()
    if form < 0.25:
        return " ".join(rng.choice(vocab).capitalize() for _ in range(rng.choice((1, 2)))) + (
            f", {chr(65 + rng.randrange(26))}{chr(65 + rng.randrange(26))}" if rng.random() < 0.5 else "")
    if form < 0.4:
        lo, hi = rng.choice(((0x4E00, 0x9FA5), (0x3041, 0x3096), (0x30A1, 0x30FA), (0xC0, 0xFF), (0xAC00, 0xD7A3)))
        return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(2, 6)))
    return _value(kind, rng, vocab)


def common_tool(rng: random.Random, vocab) -> dict:
    """A tool named and described as applications name theirs (`COMMON_VERBS`, `COMMON_NOUNS`, ...), with
    1-3 parameters named by common words; never one of `HELD_OUT_TOOL_NAMES`."""
    while True:
        verb, noun = rng.choice(COMMON_VERBS), rng.choice(COMMON_NOUNS)
        name = rng.choice((f"{verb}_{noun}", f"{verb}_{noun}", verb, f"{rng.choice(COMMON_ADJECTIVES)}_{noun}",
                           f"{noun}_{rng.choice(COMMON_AGENTS)}", f"{rng.choice(COMMON_ADJECTIVES)}_{rng.choice(COMMON_NOUNS)}"))
        if name not in HELD_OUT_TOOL_NAMES:
            break
    props, n = {}, rng.choice((1, 1, 1, 2, 2, 3))
    while len(props) < n:
        pname = rng.choice(PARAM_NAMES + ("customer_name", "style", "answer_style", "a", "b", "x", "y", "number"))
        kind = rng.choice(("string", "string", "integer", "integer", "number", "boolean", "enum"))
        spec = {"type": "string" if kind == "enum" else kind, "description": f"The {pname.replace('_', ' ')}."}
        if kind == "enum":
            spec["enum"] = rng.sample(vocab, 3)
        props[pname] = spec
    what = noun if name != verb else rng.choice(COMMON_NOUNS)
    return {"type": "function", "function": {"name": name, "description": rng.choice((
        f"{verb.capitalize()} the {what}.", f"Get the {what} for a {next(iter(props)).replace('_', ' ')}.", f"{name.replace('_', ' ').capitalize()}.")),
        "parameters": {"type": "object", "properties": props, "required": list(props)}}}


def _natural_request(name: str, args: dict, rng: random.Random) -> str:
    """A request that asks for the tool's work without the call syntax (``What is the weather in Nantucket,
    MA?``, ``Create a customer named '你好'``), for one-argument tools; others get `_request`'s forms."""
    (key, value), = args.items()
    said, words = _say(value), name.split("_")
    noun = words[-1] if len(words) > 1 else key.replace("_", " ")
    return rng.choice((f"What is the {noun} in {said}?", f"What's the {noun} for {said}?", f"Create a {noun} named '{said}'.",
                       f"Using the tool, {words[0]} a {said} {noun}.", f"{words[0].capitalize()} the {noun} of {said}, please.",
                       f"Can you {' '.join(words)} with {key.replace('_', ' ')} '{said}'?", f"I want the {noun} for '{said}'."))


def _request(name: str, args: dict, rng: random.Random, keyless: float = KEYLESS) -> str:
    """A request naming the tool and its arguments; a one-argument request leaves the key out with
    probability ``keyless`` (``Use the {name} tool on {value}.``: the key is read from the tool's schema)."""
    pairs = [(k, _say(v)) for k, v in args.items()]
    if len(pairs) == 1 and rng.random() < keyless:
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


def tool_call(rng: random.Random, split: str = "train", rounds: int = 1, style: str = "book", common_keys: float = COMMON_KEYS,
              keyless: float = KEYLESS, shuffled_keys: float = SHUFFLED_KEYS, integers: float = INTEGERS) -> Conversation:
    """1-3 random tools, then ``rounds`` exchanges of: a request naming one tool and its arguments, the
    call, the tool's result, an answer quoting it (more rounds: more call tokens per sample). The first
    round draws from ``rng`` the same way whatever ``rounds`` is, so evaluation samples stay fixed.
    ``style``: "book" (tool names and values from the split's book words: the held-out evaluation) or
    "common" (`common_tool`'s names, `_common_value`'s arguments, half the one-argument requests worded
    naturally; enum values still from the split's words). ``common_keys``: `random_tool`'s, for "book".
    ``keyless``: `_request`'s (the evaluation's samples are drawn at the default). ``shuffled_keys``: the
    probability that a request with two or more arguments names them in a random order, which the call then
    keeps (so the call's first key is the one the request names first, not always the schema's first).
    ``integers``: `random_tool`'s, for "book"."""
    vocab = words(split)
    if style not in ("book", "common"):
        raise ValueError(f"style must be 'book' or 'common', got {style!r}")
    tools = [random_tool(rng, vocab, common_keys, integers) if style == "book" else common_tool(rng, vocab) for _ in range(rng.choice((1, 2, 3)))]
    return _rounds(rng, tools, vocab, rounds, style, keyless, shuffled_keys)


def lookup_call(rng: random.Random, split: str = "train", rounds: int = 2) -> Conversation:
    """A drill in reading a key from the schema: 2-4 book-word tools of one parameter each, then ``rounds``
    exchanges (as `tool_call`'s) whose requests name the tool and the value but no key (``Use the X tool on
    V.``), so each call's key is the one property of the tool named, found among the others in the system
    message. In `tool_call`'s samples such requests are 30% of the one-argument ones (`KEYLESS`), and an hour
    of training leaves them near chance when two or more tools are bound; a quarter of the tool-call
    conversations drawn as drills did not change that measurably (`trainer.LOOKUP`; README, session 54)."""
    vocab = words(split)
    tools = [random_tool(rng, vocab, params=1) for _ in range(rng.choice((2, 3, 4)))]
    return _rounds(rng, tools, vocab, rounds, style="book", keyless=1.0, shuffled_keys=0.0)


def _rounds(rng: random.Random, tools: list[dict], vocab, rounds: int, style: str, keyless: float,
            shuffled_keys: float) -> Conversation:
    """`tool_call`'s exchanges over ``tools``: request, call, result, answer, ``rounds`` times."""
    make_value = _value if style == "book" else _common_value
    messages = []
    for r in range(rounds):
        chosen = rng.choice(tools)["function"]
        args = {k: make_value("enum" if "enum" in spec else spec["type"], rng, vocab, spec.get("enum"))
                for k, spec in chosen["parameters"]["properties"].items()}
        if shuffled_keys and len(args) > 1 and rng.random() < shuffled_keys:
            args = {k: args[k] for k in rng.sample(list(args), len(args))}
        result = rng.choice((str(rng.randint(0, 99999)), f"{rng.choice(vocab)} {rng.randint(1, 999)}", rng.choice(vocab)))
        if style == "common" and rng.random() < 0.3:
            result = rng.choice(("It's sunny.", "Done.", f"{rng.choice(vocab).capitalize()} is {rng.randint(1, 99)}.",
                                 f"Created {next(iter(args.values()))}.", str(rng.randint(0, 9))))
        if r == 0 and rng.random() < 0.3:
            messages.append({"role": "system", "content": "You are a helpful assistant."})
        natural = style == "common" and len(args) == 1 and rng.random() < 0.5
        messages += [
            {"role": "user", "content": _natural_request(chosen["name"], args, rng) if natural else _request(chosen["name"], args, rng, keyless)},
            {"role": "assistant", "content": "", "tool_calls": [{"id": f"call_{r}", "type": "function",
                                                                 "function": {"name": chosen["name"], "arguments": args}}]},
            {"role": "tool", "tool_call_id": f"call_{r}", "content": result},
            {"role": "assistant", "content": rng.choice((f"The result is {result}.", f"{chosen['name']} returned {result}.", result))},
        ]
    return Conversation("tool_call", messages, tools=tools)


# Arithmetic tools as applications bind them: an operation, the names a tool for it goes by, and how a
# request says it ("What is 37 times 91?" calls the multiplying tool with a=37, b=91).
ARITHMETIC = {
    "multiply": (("multiply", "multiply_numbers", "product", "calculate_product", "mul"), ("times", "multiplied by", "*")),
    "add": (("add", "add_numbers", "sum", "calculate_sum", "plus_tool"), ("plus", "added to", "+")),
    "subtract": (("subtract", "subtract_numbers", "difference", "minus_tool"), ("minus", "take away", "-")),
    "divide": (("divide", "divide_numbers", "quotient", "ratio"), ("divided by", "over", "/")),
    "power": (("power", "raise_to_power", "exponent"), ("to the power of", "raised to", "**")),
}


def arithmetic_call(rng: random.Random, rounds: int = 1) -> Conversation:
    """2-4 arithmetic tools (`ARITHMETIC`, never one of `HELD_OUT_TOOL_NAMES`), each of two integer
    parameters; ``rounds`` requests that say the operation in words or symbols, the call to the tool that
    does it with the two numbers in order, its result, an answer quoting it."""
    ops = rng.sample(sorted(ARITHMETIC), rng.randint(2, 4))
    names = {}
    for op in ops:
        names[op] = rng.choice([n for n in ARITHMETIC[op][0] if n not in HELD_OUT_TOOL_NAMES])
    a_name, b_name = rng.choice((("a", "b"), ("a", "b"), ("x", "y"), ("first", "second"), ("left", "right")))
    tools = [{"type": "function", "function": {"name": names[op], "description": rng.choice((
        f"{op.capitalize()} two integers.", f"{op.capitalize()} {a_name} and {b_name}.", f"Returns the {ARITHMETIC[op][0][2]} of two numbers.")),
        "parameters": {"type": "object", "properties": {a_name: {"type": "integer"}, b_name: {"type": "integer"}},
                       "required": [a_name, b_name]}}} for op in ops]
    messages = []
    for r in range(rounds):
        op = rng.choice(ops)
        a, b = (rng.randint(0, 9) if rng.random() < 0.3 else rng.randint(10, 999) for _ in range(2))
        phrase = rng.choice(ARITHMETIC[op][1])
        ask = rng.choice((f"What is {a} {phrase} {b}?", f"Use a tool: what is {a} {phrase} {b}?", f"Compute {a} {phrase} {b}.",
                          f"What's {a} {phrase} {b}? Use the tool.", f"Calculate {a} {phrase} {b}, please."))
        if op == "power":
            value = a ** b if b <= 3 else "a very large number"
        else:
            value = {"multiply": a * b, "add": a + b, "subtract": a - b, "divide": round(a / b, 4) if b else "undefined"}[op]
        messages += [
            {"role": "user", "content": ask},
            {"role": "assistant", "content": "", "tool_calls": [{"id": f"call_{r}", "type": "function",
                                                                 "function": {"name": names[op], "arguments": {a_name: a, b_name: b}}}]},
            {"role": "tool", "tool_call_id": f"call_{r}", "content": str(value)},
            {"role": "assistant", "content": rng.choice((f"The result is {value}.", f"{a} {phrase} {b} is {value}.", str(value)))},
        ]
    return Conversation("tool_call", messages, tools=tools)


# -- JSON extraction -------------------------------------------------------------------------------
def json_extraction(rng: random.Random, split: str = "train", mode: str = "schema") -> Conversation:
    """A record of 1-4 typed fields told as shuffled facts, answered as JSON. ``mode`` "schema": the
    record's JSON schema is the response format (the held-out evaluation); "object": JSON mode without a
    schema (``{"type": "json_object"}``), the keys named in the request as applications ask
    (``Return the result as a JSON with 'setup' and 'punchline' keys``)."""
    if mode not in ("schema", "object"):
        raise ValueError(f"mode must be 'schema' or 'object', got {mode!r}")
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
    if mode == "object":
        keys = [f"'{k}'" for k in names]
        listed = keys[0] if n == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
        ask = rng.choice((f"Return the result as a JSON with {listed} keys.", f"Answer in JSON with the keys {listed}.",
                          f"Return nothing other than JSON, with {listed} {'key' if n == 1 else 'keys'}."))
        text = " ".join(facts) + " " + ask if rng.random() < 0.5 else ask + " " + " ".join(facts)
        return Conversation("json", [{"role": "user", "content": text}, {"role": "assistant", "content": json.dumps(record)}],
                            response_format={"type": "json_object"})
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
# How applications hand a model a document and a question, besides RULER's single user message: the
# document in the system message (a LangChain prompt template), in the chat template's documents
# (`ChatJamba(documents=...)`, `JambaDocumentsQueryEngine`), and LlamaIndex's own question-answering
# prompt (what `SummaryIndex(...).as_query_engine(llm=JambaLLM(...))` sends). Weights of `needle`'s draw.
NEEDLE_STYLES = {"ruler": 0.4, "system": 0.2, "documents": 0.2, "llamaindex": 0.2}
_DOC_INTROS = ("Answer from this document:", "Answer from the document below.", "Use the following text to answer the question.",
               "You answer questions about this text.", "Context:", "Here is a document.")
_DOC_TITLES = ("Moby-Dick", "document", "notes", "book", "manual", "reference", "report")


def needle(rng: random.Random, haystack, length: int, split: str = "train", style: str | None = None) -> Conversation:
    """A RULER sample (`jamba_core.eval.ruler`) of ``length`` tokens, its task drawn 4:2:2:1 from single,
    multi-key, multi-value needles and variable tracking; a task whose fixed text does not fit the length
    with this tokenizer (variable tracking in 256 tokens when every space is a token) falls back to the
    single needle. ``style`` (drawn from `NEEDLE_STYLES` when None): "ruler" (RULER's user message:
    instruction, text, question), "system" (the text in the system message, the question as the user's),
    "documents" (the text as the template's one document), "llamaindex" (LlamaIndex's chat text-QA
    prompt around the text and the question). The answer is RULER's in every style."""
    task = rng.choices(ruler.TASKS, weights=(4, 2, 2, 1))[0]
    depth, seed = rng.uniform(0, 100), rng.randrange(2**31)
    style = rng.choices(list(NEEDLE_STYLES), weights=list(NEEDLE_STYLES.values()))[0] if style is None else style
    if style not in NEEDLE_STYLES:
        raise ValueError(f"style must be one of {sorted(NEEDLE_STYLES)}, got {style!r}")
    try:
        sample = ruler.make_sample(task, length, depth, seed, haystack, split=split)
    except ValueError:  # the task's fixed text does not fit this length
        task = ruler.TASKS[0]
        sample = ruler.make_sample(task, length, depth, seed, haystack, split=split)
    answer = {"role": "assistant", "content": sample.target}
    if style == "ruler":
        return Conversation(task, [{"role": "user", "content": sample.prompt}, answer])
    instruction, rest = sample.prompt.split("\n", 1)  # RULER's prompt: instruction line, text, question line
    text, question = rest.rsplit("\n", 1)
    if rng.random() < 0.3:  # the instruction kept in front of the question
        question = f"{instruction} {question}"
    title = rng.choice(_DOC_TITLES)
    if style == "system":
        return Conversation(task, [{"role": "system", "content": f"{rng.choice(_DOC_INTROS)}\n\n{text}"},
                                   {"role": "user", "content": question}, answer])
    if style == "documents":
        system = [{"role": "system", "content": rng.choice(("Answer from the documents.", "You are a helpful assistant."))}] if rng.random() < 0.5 else []
        return Conversation(task, system + [{"role": "user", "content": question}, answer],
                            documents=[{"title": title, "text": text}])
    from llama_index.core.prompts.chat_prompts import CHAT_TEXT_QA_PROMPT

    context = f"source: {title}\n\n{text}" if rng.random() < 0.5 else text  # a node's metadata, as LlamaIndex shows it
    messages = [{"role": m.role.value, "content": m.content} for m in CHAT_TEXT_QA_PROMPT.format_messages(context_str=context, query_str=question)]
    return Conversation(task, messages + [answer])


# the demo's document (`jamba_core.demo.STDLIB_MODULES`) stays out of the training haystacks
DOCS_MODULES = ("collections", "itertools", "functools", "string", "random", "statistics", "datetime", "shutil", "pathlib",
                "argparse", "logging", "csv", "re", "math", "dataclasses", "enum", "copy", "pprint", "difflib", "zipfile")


def docs_haystack(tokenizer, moby):
    """A second haystack, technical prose unlike the book: the plain-text documentation (pydoc) of the
    standard-library modules `DOCS_MODULES` (as this Python renders them, memory addresses removed), with the
    book haystack ``moby``'s key words (so keys keep their split)."""
    import pydoc

    text = "\n\n".join(pydoc.plain(pydoc.render_doc(name, renderer=pydoc.plaintext)) for name in DOCS_MODULES)
    # default values render with their memory address (``<function copy2 at 0x7f...>``) and logging's module data
    # lists the process's live handlers (``<weakref at 0x...; to 'StreamHandler'>``, as many as the imports made):
    # the needle samples cut from this text, and so the seeded training runs, differed from process to process
    text = "\n".join(line for line in text.split("\n") if "<weakref at 0x" not in line)
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    hay = ruler.Haystack(tokenizer, text=text)
    hay.words = moby.words
    return hay


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
    kw = dict(tools=conv.tools, response_format=conv.response_format, documents=conv.documents)
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
