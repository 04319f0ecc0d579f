"""Tool-call and JSON-extraction evaluation of any LangChain chat model, on held-out tools and values.

Conversations come from `jamba_core.train.data` with ``split="test"``: tool names, argument values and
record values are words the training split never uses. Tool calls are scored without constrained
decoding (``tool_choice="auto"``, free generation then parsing):

- parsed: the reply holds at least one well-formed tool call and no malformed one;
- correct: the first call has the expected name and exactly the expected arguments (JSON values equal);
- answer: given the expected call and the tool's result, the next reply contains the result.

JSON extraction asks for a record described in prose through ``with_structured_output`` (the schema
as the response format); exact is the returned object equal to the record.

Copying asks for a sequence of held-out words and numbers back verbatim (`data.repeat`): what tool
arguments, needle values and quoted results are built on (the induction pattern, Olsson et al. 2022), and
the first thing a small model's training has to form.
"""

from __future__ import annotations

import json
import random
import time

from ..train import data
from .ruler import reply_text


def _lc_messages(messages: list[dict]):
    from langchain_core.messages import HumanMessage, SystemMessage

    return [SystemMessage(m["content"]) if m["role"] == "system" else HumanMessage(m["content"]) for m in messages]


def evaluate_tool_calls(chat_model, samples: int = 100, seed: int = 0, split: str = "test", max_new_tokens: int = 128) -> dict:
    """Score `chat_model` (any LangChain `BaseChatModel` with `bind_tools`) on `samples` conversations.

    Returns ``{"samples", "parsed", "correct", "answer", "seconds", "failures": [...]}`` (rates in 0..1;
    the first 10 failures with what was expected and what came back).
    """
    from langchain_core.messages import AIMessage, ToolMessage

    counts = {"parsed": 0, "correct": 0, "answer": 0}
    failures = []
    start = time.perf_counter()
    for i in range(samples):
        conv = data.tool_call(random.Random(f"{seed}:{i}"), split)
        asked = [m for m in conv.messages if m["role"] in ("system", "user")]
        call = conv.messages[-3]["tool_calls"][0]["function"]
        result = conv.messages[-2]["content"]
        bound = chat_model.bind_tools(conv.tools)
        reply = bound.invoke(_lc_messages(asked), max_tokens=max_new_tokens)
        parsed = bool(reply.tool_calls) and not reply.invalid_tool_calls
        correct = parsed and reply.tool_calls[0]["name"] == call["name"] and _same(reply.tool_calls[0]["args"], call["arguments"])
        follow = _lc_messages(asked) + [AIMessage("", tool_calls=[{"name": call["name"], "args": call["arguments"], "id": "call_0"}]),
                                        ToolMessage(result, tool_call_id="call_0")]
        final = reply_text(bound.invoke(follow, max_tokens=max_new_tokens))
        answered = result in final
        counts["parsed"] += parsed
        counts["correct"] += correct
        counts["answer"] += answered
        if not (correct and answered) and len(failures) < 10:
            failures.append({"request": asked[-1]["content"], "expected": call, "result": result,
                             "got": reply.tool_calls or reply.content, "invalid": reply.invalid_tool_calls, "final": final})
    return {"samples": samples, "split": split, **{k: v / samples for k, v in counts.items()},
            "seconds": round(time.perf_counter() - start, 1), "failures": failures}


def evaluate_json(chat_model, samples: int = 100, seed: int = 0, split: str = "test") -> dict:
    """JSON extraction through ``with_structured_output(schema, method="json_schema")`` (constrained to
    the schema where the model supports it): ``{"samples", "exact", "failures"}``, exact = the returned
    object equals the record described in the text; an answer that does not parse (cut off, not JSON)
    counts as wrong, its error kept in the failure."""
    from langchain_core.exceptions import OutputParserException
    from langchain_core.messages import HumanMessage

    exact, failures = 0, []
    for i in range(samples):
        conv = data.json_extraction(random.Random(f"json:{seed}:{i}"), split)
        expected = json.loads(conv.messages[-1]["content"])
        schema = conv.response_format["json_schema"]["schema"]
        try:
            got = chat_model.with_structured_output(schema, method="json_schema").invoke([HumanMessage(conv.messages[0]["content"])])
        except OutputParserException as err:
            got = {"error": str(err).splitlines()[0]}
        exact += got == expected
        if got != expected and len(failures) < 10:
            failures.append({"text": conv.messages[0]["content"], "expected": expected, "got": got})
    return {"samples": samples, "split": split, "exact": exact / samples, "failures": failures}


def evaluate_copying(chat_model, samples: int = 50, seed: int = 0, split: str = "test", max_items: int = 16) -> dict:
    """Ask `chat_model` to repeat `samples` sequences of 4..``max_items`` words (``split``'s) and numbers:
    ``{"samples", "exact", "word_accuracy", "failures"}``, exact = the reply (stripped) is the sequence,
    word accuracy = the share of the sequence's items that the reply has at the same index."""
    from langchain_core.messages import HumanMessage

    exact, words, failures = 0, 0.0, []
    for i in range(samples):
        conv = data.repeat(random.Random(f"copy:{seed}:{i}"), max_items=max_items, split=split)
        want = conv.messages[-1]["content"]
        got = reply_text(chat_model.invoke([HumanMessage(conv.messages[0]["content"])])).strip()
        a, b = got.replace(",", " ").split(), want.replace(",", " ").split()
        exact += got == want.strip()
        words += sum(x == y for x, y in zip(a, b)) / len(b)
        if got != want.strip() and len(failures) < 10:
            failures.append({"expected": want, "got": got})
    return {"samples": samples, "split": split, "exact": exact / samples, "word_accuracy": words / samples, "failures": failures}


# Real places (no training value is one: values are book words, numbers and random characters) and the
# requests users write about them: the tools are held out (`data.HELD_OUT_TOOL_NAMES`), and so are three of
# the four wordings (training asks "What is the {noun} in {value}?").
PLACES = ("Nantucket", "London", "Paris", "Madrid", "Denver", "Seattle", "Tokyo", "Cairo", "Lima", "Boston", "Berlin",
          "Chicago", "Nairobi", "Reykjavik", "Oslo", "Mumbai", "Toronto", "Santiago", "Kyoto", "Dublin", "Lisbon",
          "Helsinki", "Montreal", "Auckland", "Marrakesh")
PLACE_REQUESTS = (("get_weather", "What is the weather in {}?"), ("get_weather", "Get the weather for {}."),
                  ("get_weather", "What's the weather like in {} right now?"), ("get_population", "How many people live in {}?"))


def _place_tools() -> list[dict]:
    return [{"type": "function", "function": {"name": name, "description": what,
             "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city."}}, "required": ["city"]}}}
            for name, what in (("get_weather", "Get the current weather in a city."), ("get_population", "Get the population of a city."))]


def evaluate_place_calls(chat_model, places: tuple[str, ...] = PLACES, max_new_tokens: int = 64) -> dict:
    """Tool calls naming real places, as applications bind them (``get_weather(city)``, ``get_population(city)``,
    both tools bound to every request): each of `PLACE_REQUESTS` for each place, unconstrained.
    ``{"samples", "parsed", "correct", "by_request": {wording: correct rate}, "failures"}``; correct = the first
    call has the expected name and ``{"city": place}`` exactly."""
    from langchain_core.messages import HumanMessage

    bound = chat_model.bind_tools(_place_tools())
    parsed = correct = 0
    by_request, failures = {}, []
    for name, wording in PLACE_REQUESTS:
        hits = 0
        for place in places:
            reply = bound.invoke([HumanMessage(wording.format(place))], max_tokens=max_new_tokens)
            ok_parse = bool(reply.tool_calls) and not reply.invalid_tool_calls
            ok = ok_parse and reply.tool_calls[0]["name"] == name and _same(reply.tool_calls[0]["args"], {"city": place})
            parsed, correct, hits = parsed + ok_parse, correct + ok, hits + ok
            if not ok and len(failures) < 10:
                failures.append({"request": wording.format(place), "got": reply.tool_calls or reply.content})
        by_request[wording] = hits / len(places)
    n = len(places) * len(PLACE_REQUESTS)
    return {"samples": n, "parsed": parsed / n, "correct": correct / n, "by_request": by_request, "failures": failures}


NEEDLE_FORMS = ("ruler", "system", "llamaindex", "documents")


def evaluate_needle_forms(chat_model, samples: int = 12, seed: int = 0, document: str | None = None,
                          max_chars: int = 40_000) -> dict:
    """A needle ("One of the special magic numbers for KEY is: VALUE.", KEY from held-out words) hidden in
    a document at depths spread over 0..1, asked for in the forms applications send
    (`jamba_core.train.data.NEEDLE_STYLES`): "ruler" (RULER's user message), "system" (the document in the
    system message, as a LangChain prompt template puts it), "llamaindex" (LlamaIndex's chat text-QA
    prompt, what its query engines send) and "documents" (the chat template's documents; only for a
    `ChatJamba`). ``document``: default the demo's (pydoc of `jamba_core.demo.STDLIB_MODULES`, which no
    training haystack uses), cut to ``max_chars``. Returns ``{"samples", "chars", "forms": {form: share
    of replies holding the value}, "failures"}`` (the first 10)."""
    from langchain_core.messages import HumanMessage, SystemMessage
    from llama_index.core.prompts.chat_prompts import CHAT_TEXT_QA_PROMPT

    from ..demo import hide_needle, stdlib_documentation
    from .ruler import _NIAH_INSTRUCTION

    text = (stdlib_documentation() if document is None else document)[:max_chars]
    forms = [f for f in NEEDLE_FORMS if f != "documents" or type(chat_model).__name__ == "ChatJamba"]
    hits, failures = dict.fromkeys(forms, 0), []
    vocab = data.words("test")
    for i in range(samples):
        rng = random.Random(f"forms:{seed}:{i}")
        key, value = f"{rng.choice(vocab)}-{rng.choice(vocab)}", str(rng.randint(1_000_000, 9_999_999))
        doc, needle, question, _ = hide_needle(text, depth=(i + 0.5) / samples, key=key, value=value)
        for form in forms:
            if form == "ruler":
                reply = chat_model.invoke([HumanMessage(f"{_NIAH_INSTRUCTION}\n{doc}\n{question}")])
            elif form == "system":
                reply = chat_model.invoke([SystemMessage(f"Answer from this document:\n\n{doc}"), HumanMessage(question)])
            elif form == "llamaindex":
                msgs = CHAT_TEXT_QA_PROMPT.format_messages(context_str=doc, query_str=question)
                reply = chat_model.invoke([SystemMessage(m.content) if m.role.value == "system" else HumanMessage(m.content) for m in msgs])
            else:
                reply = chat_model.invoke([HumanMessage(question)], documents=[{"title": "document", "text": doc}])
            got = reply_text(reply)
            hits[form] += value in got
            if value not in got and len(failures) < 10:
                failures.append({"form": form, "depth": round((i + 0.5) / samples, 3), "needle": needle, "got": got})
    return {"samples": samples, "chars": len(text), "forms": {f: n / samples for f, n in hits.items()}, "failures": failures}


def _same(a, b) -> bool:
    """Equal as JSON (so ``True`` is not ``1`` and ``5`` is not ``"5"``)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
