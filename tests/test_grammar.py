"""Grammar-constrained decoding: masks walked with random logits until termination, outputs checked."""

import json

import jsonschema
import pytest
import torch

from jamba_core.chat.grammar import (
    BannedTokensConstraint,
    GrammarConstraint,
    normalize_tools,
    response_format_constraint,
    tool_choice_constraint,
)
from jamba_core.chat.tool_calls import parse_output
from jamba_core.tokenizer import train_tokenizer

SEEDS = range(100)
PAD_IDS = 64  # the model's vocabulary is padded past the tokenizer's: those ids are never allowed

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 10},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search documents",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": 12},
            "filters": {"type": "object", "properties": {
                "tags": {"type": "array", "items": {"enum": ["whale", "ship", "sea"]}, "maxItems": 3},
                "exact": {"type": "boolean"}}, "required": ["tags"]}},
            "required": ["query", "filters"]}}},
    {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {}}},
]
SCHEMAS = {t["name"]: t["parameters"] for t in normalize_tools(TOOLS)}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(vocab_size=4096)


@pytest.fixture(scope="module")
def vocab(tok):
    return len(tok) + PAD_IDS


@pytest.fixture(scope="module")
def stops(tok):
    return sorted({tok.eos_token_id, tok.get_vocab()["<|eom|>"]})


def walk(constraint, vocab, seed, max_steps=600, bias=None):
    """Sample uniformly among the allowed tokens (argmax of masked random logits) until termination.

    Returns the sampled ids, the last one being a stop token when the constraint terminated.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(max_steps):
        logits = torch.randn(vocab, generator=gen)
        if bias is not None:
            logits += bias
        constraint.mask_logits(logits)
        assert torch.isinf(logits[vocab - PAD_IDS:]).all(), "padded ids must stay disallowed"
        token = int(torch.argmax(logits))
        assert logits[token] > float("-inf"), "the mask allowed nothing"
        constraint.accept(token)
        ids.append(token)
        if constraint.is_terminated():
            return ids
    raise AssertionError(f"seed {seed}: not terminated after {max_steps} steps")


def decode(tok, ids, stops):
    assert ids[-1] in stops
    return tok.decode(ids[:-1], skip_special_tokens=False)


def check_calls(parsed, allowed_names):
    assert parsed.tool_calls and not parsed.invalid_tool_calls, parsed
    for call in parsed.tool_calls:
        assert call["name"] in allowed_names
        jsonschema.validate(call["args"], SCHEMAS[call["name"]])


@pytest.mark.parametrize("call_format", ["jamba", "hermes"])
@pytest.mark.parametrize("choice", ["any", "required"])
def test_forced_any_yields_valid_calls_100_of_100(tok, vocab, stops, call_format, choice):
    for seed in SEEDS if choice == "any" else range(10):  # "required" is the same constraint
        constraint = tool_choice_constraint(tok, TOOLS, choice, call_format=call_format, vocab_size=vocab,
                                            stop_token_ids=stops)
        # a uniform walk ends a string only when it draws a closing token: with a tokenizer whose
        # vocabulary has few of them (the fallback one, trained on Python's own sources) that can take
        # more than 600 steps; validity, not length, is what is tested here
        ids = walk(constraint, vocab, seed, max_steps=3000)
        parsed = parse_output(decode(tok, ids, stops), call_format)
        check_calls(parsed, set(SCHEMAS))
        assert parsed.content == ""


@pytest.mark.parametrize("call_format", ["jamba", "hermes"])
@pytest.mark.parametrize("name", ["search", "now"])
def test_named_tool_among_several_yields_exactly_that_call_100_of_100(tok, vocab, stops, call_format, name):
    choice = name if name == "search" else {"type": "function", "function": {"name": name}}
    for seed in SEEDS:
        constraint = tool_choice_constraint(tok, TOOLS, choice, call_format=call_format, vocab_size=vocab,
                                            stop_token_ids=stops)
        parsed = parse_output(decode(tok, walk(constraint, vocab, seed), stops), call_format)
        check_calls(parsed, {name})
        assert len(parsed.tool_calls) == 1


@pytest.fixture(scope="module")
def chatml_tok():
    """A tokenizer with ChatML's call markers as single tokens (as Jamba Reasoning 3B's)."""
    tok = train_tokenizer(vocab_size=4096)
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    return tok


@pytest.mark.parametrize("choice", ["any", "search"])
def test_hermes_with_single_token_markers_forces_those_tokens(chatml_tok, stops, choice):
    tok, vocab = chatml_tok, len(chatml_tok) + PAD_IDS
    open_id, close_id = tok.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    for seed in range(50):
        constraint = tool_choice_constraint(tok, TOOLS, choice, call_format="hermes", vocab_size=vocab,
                                            stop_token_ids=stops)
        ids = walk(constraint, vocab, seed)
        assert ids[0] == open_id and ids[-2] == close_id and ids.count(open_id) == ids.count(close_id)
        parsed = parse_output(decode(tok, ids, stops), "hermes")
        check_calls(parsed, set(SCHEMAS) if choice == "any" else {choice})
        assert choice == "any" or len(parsed.tool_calls) == 1
    none = tool_choice_constraint(tok, TOOLS, "none", call_format="hermes", vocab_size=vocab, stop_token_ids=stops)
    logits = torch.zeros(vocab)
    none.mask_logits(logits)
    assert torch.isinf(logits[[open_id, close_id]]).all()


def test_forced_call_uses_the_marker_special_tokens_and_the_template_layout(tok, vocab, stops):
    open_id, close_id = tok.get_vocab()["<tool_calls>"], tok.get_vocab()["</tool_calls>"]
    for seed in range(10):
        constraint = tool_choice_constraint(tok, TOOLS, "now", vocab_size=vocab, stop_token_ids=stops)
        ids = walk(constraint, vocab, seed)
        assert ids.count(open_id) == 1 and ids.count(close_id) == 1 and ids[-2] == close_id
        assert decode(tok, ids, stops).lstrip(" ") == \
            '<tool_calls>[\n    {"name": "now", "arguments": {}}\n]</tool_calls>'


def test_special_tokens_are_never_allowed_inside_the_json(tok, vocab, stops):
    special = sorted(set(tok.all_special_ids) | set(tok.added_tokens_decoder))
    constraint = tool_choice_constraint(tok, TOOLS, "search", vocab_size=vocab, stop_token_ids=stops)
    prefix = tok.encode('[\n    {"name": "search", "arguments": {"query": "ab', add_special_tokens=False)
    constraint.accept(tok.get_vocab()["<tool_calls>"])
    for token in prefix:
        constraint.accept(token)
    logits = torch.zeros(vocab)
    constraint.mask_logits(logits)
    assert torch.isinf(logits[special]).all()
    assert torch.isfinite(logits).sum() > 100  # free text inside the string


def test_after_the_calls_only_a_stop_token_is_allowed(tok, vocab, stops):
    vocab_ids = tok.get_vocab()
    constraint = tool_choice_constraint(tok, TOOLS, "any", vocab_size=vocab, stop_token_ids=stops)
    logits = torch.zeros(vocab)
    constraint.mask_logits(logits)
    assert set(torch.isfinite(logits).nonzero().flatten().tolist()) == {vocab_ids["<tool_calls>"], tok.encode(" ")[-1]}
    constraint.accept(vocab_ids["<tool_calls>"])
    body = '[\n    {"name": "get_weather", "arguments": {"city": "Paris"}}\n]'
    for token in tok.encode(body, add_special_tokens=False):
        constraint.accept(token)
    logits = torch.zeros(vocab)
    constraint.mask_logits(logits)
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [vocab_ids["</tool_calls>"]]
    constraint.accept(vocab_ids["</tool_calls>"])
    logits = torch.zeros(vocab)
    constraint.mask_logits(logits)
    assert torch.isfinite(logits).nonzero().flatten().tolist() == stops
    assert not constraint.is_terminated()
    constraint.accept(stops[-1])
    assert constraint.is_terminated()


def test_a_disallowed_token_is_refused(tok, vocab, stops):
    constraint = tool_choice_constraint(tok, TOOLS, "any", vocab_size=vocab, stop_token_ids=stops)
    with pytest.raises(ValueError):
        constraint.accept(tok.encode("hello", add_special_tokens=False)[0])


def test_tool_choice_none_never_yields_a_call(tok, vocab, stops):
    open_id = tok.get_vocab()["<tool_calls>"]
    for seed in SEEDS:
        constraint = tool_choice_constraint(tok, TOOLS, "none", vocab_size=vocab, stop_token_ids=stops)
        assert isinstance(constraint, BannedTokensConstraint)
        gen, ids = torch.Generator().manual_seed(seed), []
        for _ in range(40):
            logits = torch.randn(vocab, generator=gen)
            logits[open_id] = 100.0  # the model wants to call a tool
            constraint.mask_logits(logits)
            token = int(torch.argmax(logits))
            constraint.accept(token)
            if constraint.is_terminated():
                break
            ids.append(token)
        assert open_id not in ids
        parsed = parse_output(tok.decode(ids, skip_special_tokens=False))
        assert not parsed.tool_calls and not parsed.invalid_tool_calls


def test_auto_and_no_response_format_are_free(tok):
    assert tool_choice_constraint(tok, TOOLS, "auto") is None
    assert tool_choice_constraint(tok, TOOLS, None) is None
    assert response_format_constraint(tok, None) is None
    assert response_format_constraint(tok, {"type": "text"}) is None


def test_unknown_tool_or_format_raises(tok):
    with pytest.raises(ValueError):
        tool_choice_constraint(tok, TOOLS, "fly")
    with pytest.raises(ValueError):
        tool_choice_constraint(tok, [], "any")
    with pytest.raises(ValueError):
        tool_choice_constraint(tok, TOOLS, "any", call_format="xml")
    # read as a bare JSON schema, {"type": "xml"} reached xgrammar: 'json_schema_converter.cc: Unsupported type "xml"'
    for kind in ("xml", ["string", "xml"]):
        with pytest.raises(ValueError, match=r"response_format type .*xml.* is neither a response format \('text'"):
            response_format_constraint(tok, {"type": kind})


RESPONSE_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 10},
        "year": {"type": "integer", "minimum": 1800, "maximum": 2100},
        "rating": {"type": "number"},
        "genres": {"type": "array", "items": {"enum": ["adventure", "epic", "tragedy"]}, "minItems": 1, "maxItems": 3},
        "author": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                    "alive": {"type": "boolean"}}, "required": ["name"]},
        "isbn": {"anyOf": [{"type": "string", "minLength": 10, "maxLength": 13}, {"type": "null"}]},
    },
    "required": ["title", "year", "genres", "author", "isbn"],
}


@pytest.mark.parametrize("wrap", ["openai", "bare"])
def test_json_schema_response_validates_100_of_100(tok, vocab, stops, wrap):
    response_format = RESPONSE_SCHEMA if wrap == "bare" else \
        {"type": "json_schema", "json_schema": {"name": "book", "schema": RESPONSE_SCHEMA, "strict": True}}
    for seed in SEEDS if wrap == "openai" else range(10):  # the bare schema only changes the unwrapping
        constraint = response_format_constraint(tok, response_format, vocab_size=vocab, stop_token_ids=stops)
        value = json.loads(decode(tok, walk(constraint, vocab, seed), stops))  # strict JSON: no raw control chars
        jsonschema.validate(value, RESPONSE_SCHEMA)


def test_json_object_mode_yields_a_json_object(tok, vocab, stops):
    # Free strings rarely close under uniform sampling: favour the tokens that close strings and objects.
    bias = torch.zeros(vocab)
    for token, token_id in tok.get_vocab().items():
        if any(c in token for c in '"}]'):
            bias[token_id] = 4.0
    for seed in range(20):
        constraint = response_format_constraint(tok, {"type": "json_object"}, vocab_size=vocab, stop_token_ids=stops)
        value = json.loads(decode(tok, walk(constraint, vocab, seed, max_steps=2000, bias=bias), stops))
        assert isinstance(value, dict)


def test_mask_handles_reduced_precision_and_unpadded_logits(tok, stops):
    constraint = response_format_constraint(tok, {"type": "json_object"}, stop_token_ids=stops)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.zeros(len(tok), dtype=dtype)
        constraint.mask_logits(logits)
        allowed = torch.isfinite(logits).nonzero().flatten().tolist()
        # every allowed first token opens the object (a tokenizer may merge "{" with what follows, e.g. '{"')
        assert allowed and all(tok.decode([i]).strip()[:1] in ("{", "") for i in allowed)


def accepts(tok, constraint, text):
    """Whether the constraint takes ``text`` (tokenized as the tokenizer does), then a stop token."""
    try:
        for token in tok.encode(text, add_special_tokens=False):
            constraint.accept(token)
        constraint.accept(tok.eos_token_id)
    except ValueError:
        return False
    return constraint.is_terminated()


@pytest.mark.parametrize("text, ok", [
    ('{"s": "abcd"}', True), ('{"s": "abcde"}', False),  # maxLength 4
    ('{"s": "a\x12"}', False), ('{"s": "a\nb"}', False),  # raw control characters are not JSON
    ('{"s": "a\\nb"}', False),  # xgrammar takes no escapes in a length-bounded string
    ('{"s": "東京🐋"}', True),
])
def test_length_bounded_strings_are_valid_json(tok, stops, text, ok):
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 4}}, "required": ["s"]}
    assert accepts(tok, response_format_constraint(tok, schema, stop_token_ids=stops), text) is ok


def test_invalid_utf8_is_never_allowed_in_strings(tok, stops):
    vocab = tok.get_vocab()
    for seq, ok in [([0xED, 0xA0, 0x80], False), ([0xE0, 0x9B, 0x9A], False), ([0xE4, 0xB8, 0xAD], True)]:
        for schema in ({"type": "string"}, {"type": "string", "maxLength": 5}):
            constraint = response_format_constraint(tok, schema, stop_token_ids=stops)
            try:
                for token in tok.encode('"', add_special_tokens=False) + [vocab[_byte_token(b)] for b in seq]:
                    constraint.accept(token)
                taken = True
            except ValueError:
                taken = False
            assert taken is ok, (bytes(seq), schema)


def _byte_token(byte: int) -> str:
    """The byte-level BPE spelling of one byte (GPT-2's byte-to-unicode table)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if byte in printable:
        return chr(byte)
    return chr(256 + [b for b in range(256) if b not in printable].index(byte))


def test_grammar_constraint_is_returned_for_forced_choices(tok):
    assert isinstance(tool_choice_constraint(tok, TOOLS, "any"), GrammarConstraint)
    assert isinstance(response_format_constraint(tok, {"type": "json_object"}), GrammarConstraint)


# -- through the engine, within a token budget -------------------------------------------------------

BUDGET_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add numbers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}},
]


BUDGET_SCHEMAS = {t["name"]: t["parameters"] for t in normalize_tools(BUDGET_TOOLS)}


@pytest.mark.parametrize("tool_choice", ["get_weather", "any"])
def test_forced_call_finishes_within_the_token_budget_on_random_weights(tiny_engine, tool_choice):
    """Random weights never choose a closing quote; the constraint closes the output as the budget runs
    out, so every forced call is complete and valid within max_new_tokens."""
    import jsonschema

    from jamba_core.chat import chat

    for seed in range(20):
        result = chat(tiny_engine, [{"role": "user", "content": "Weather in Paris for 3 days?"}], tools=BUDGET_TOOLS,
                      tool_choice=tool_choice, parallel_tool_calls=False, max_new_tokens=96, temperature=1.0, seed=seed)
        assert not result.invalid_tool_calls, result.text
        assert len(result.tool_calls) == 1
        call = result.tool_calls[0]
        assert tool_choice == "any" or call["name"] == tool_choice
        jsonschema.validate(call["args"], BUDGET_SCHEMAS[call["name"]])


def test_json_schema_answer_finishes_within_the_token_budget_on_random_weights(tiny_engine):
    import jsonschema

    from jamba_core.chat import chat

    # what closing must still write once the string is cut: the rest of this structure
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["title", "year"]}
    for seed in range(20):
        result = chat(tiny_engine, [{"role": "user", "content": "Describe Moby-Dick."}], max_new_tokens=96, temperature=1.0, seed=seed,
                      response_format={"type": "json_schema", "json_schema": {"name": "book", "schema": schema}})
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.content), schema)


def drive(constraint, tok, budget: int, model) -> list[int]:
    """Argmax of ``model(step, ids)``'s logits, masked, telling the constraint how many tokens are left,
    until termination, which must come within ``budget`` tokens."""
    ids = []
    for step in range(budget):
        constraint.remaining_tokens = budget - step
        logits = model(step, ids)
        constraint.mask_logits(logits)
        ids.append(int(torch.argmax(logits)))
        constraint.accept(ids[-1])
        if constraint.is_terminated():
            return ids
    raise AssertionError(f"not terminated within {budget} tokens: {tok.decode(ids)!r}")


def walk_with_budget(constraint, tok, budget: int, seed: int, bias: torch.Tensor) -> list[int]:
    """`drive` a model of random logits plus ``bias`` (a preference)."""
    gen = torch.Generator().manual_seed(seed)
    return drive(constraint, tok, budget, lambda step, ids: torch.randn(bias.shape[0], generator=gen) + bias)


@pytest.mark.parametrize("kind", ["number", "integer"])
def test_a_number_the_model_keeps_extending_still_ends_within_the_budget(tok, vocab, stops, kind):
    """A model that prefers digits (random weights often do) would write one JSON number for ever; where a
    brace may not close yet (a required key follows), the closing window ends the number with a comma."""
    schema = {"type": "object", "properties": {"a": {"type": kind}, "b": {"type": kind}, "c": {"type": "string"}},
              "required": ["a", "b", "c"]}
    digits = torch.zeros(vocab)
    for token, i in tok.get_vocab().items():
        if token.strip("Ġ▁ ").isdigit():
            digits[i] = 20.0
    budget = 60
    for seed in range(20):
        constraint = response_format_constraint(tok, {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
                                                vocab_size=vocab, stop_token_ids=stops)
        ids = walk_with_budget(constraint, tok, budget, seed, bias=digits)
        jsonschema.validate(json.loads(decode(tok, ids, stops)), schema)


@pytest.mark.parametrize("call_format", ["jamba", "hermes"])
def test_a_model_that_keeps_adding_calls_still_ends_within_the_budget(tok, vocab, stops, call_format):
    """A model that prefers commas would open call after call; in the closing window no comma may open
    another one while the array can still end (through a bare newline where the vocabulary has no
    ``\\n]``), so the output holds only complete calls."""
    commas = torch.zeros(vocab)
    for token, i in tok.get_vocab().items():
        if "," in token:
            commas[i] = 20.0
    budget = 80
    for seed in range(20):
        constraint = tool_choice_constraint(tok, BUDGET_TOOLS, "any", call_format=call_format, vocab_size=vocab, stop_token_ids=stops)
        ids = walk_with_budget(constraint, tok, budget, seed, bias=commas)
        parsed = parse_output(decode(tok, ids, stops), call_format)
        assert parsed.tool_calls and not parsed.invalid_tool_calls, parsed
        for call in parsed.tool_calls:
            jsonschema.validate(call["args"], BUDGET_SCHEMAS[call["name"]])


def write_with_budget(constraint, tok, budget: int, text: str) -> list[int]:
    """`drive` a model that knows what it wants to write (``text``): each step it prefers the longest
    allowed token that continues it, else any allowed one."""
    texts = {i: tok.decode([i]) for i in range(len(tok))}

    def model(step, ids):
        written, logits = "".join(texts.get(i, "") for i in ids), torch.zeros(len(tok) + PAD_IDS)
        for i, piece in texts.items():
            if piece and text.startswith(written + piece):
                logits[i] = 10.0 + len(piece)
        return logits

    return drive(constraint, tok, budget, model)


def test_a_value_that_fits_the_budget_is_left_whole(tok, vocab, stops):
    """The budget's closing rules act only where the tokens left are what closing needs: with
    ``closing_margin`` tokens to spare, the answer the model wants is written whole; with fewer, it is cut
    but still valid, down to the structure's own length. (A fixed 24-token window emptied the string at any
    budget under its natural length + 24: ``ChatJamba(max_tokens=40)`` called get_weather(city='').)"""
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
              "required": ["title", "year"]}
    want = '{"title": "Moby-Dick; or, The Whale", "year": 1851}'
    fmt = {"type": "json_schema", "json_schema": {"name": "book", "schema": schema}}
    natural = len(write_with_budget(response_format_constraint(tok, fmt, vocab_size=vocab, stop_token_ids=stops), tok, 200, want))
    whole = write_with_budget(response_format_constraint(tok, fmt, vocab_size=vocab, stop_token_ids=stops), tok,
                              natural + GrammarConstraint.closing_margin, want)
    assert decode(tok, whole, stops) == want
    shortest = len(write_with_budget(response_format_constraint(tok, fmt, vocab_size=vocab, stop_token_ids=stops), tok, 200,
                                     '{"title": "", "year": 0}'))
    for budget in range(shortest + 1, natural):
        ids = write_with_budget(response_format_constraint(tok, fmt, vocab_size=vocab, stop_token_ids=stops), tok, budget, want)
        answer = json.loads(decode(tok, ids, stops))
        jsonschema.validate(answer, schema)
        assert want.startswith(decode(tok, ids, stops).split('", "year"')[0])  # the title cut, not changed


@pytest.mark.parametrize("call_format", ["jamba", "hermes"])
def test_a_tool_call_that_fits_the_budget_keeps_its_arguments(tok, vocab, stops, call_format):
    """The same for a forced call: at its natural length and ``closing_margin`` + 1 its arguments are the
    model's, and no shorter budget from the structure's own length up leaves the call invalid."""
    args = {"city": "Nantucket, MA", "days": 3}
    call = json.dumps({"name": "get_weather", "arguments": args})
    want = (f"<tool_calls>[\n    {call}\n]</tool_calls>" if call_format == "jamba" else f"<tool_call>\n{call}\n</tool_call>")
    make = lambda: tool_choice_constraint(tok, BUDGET_TOOLS, "get_weather", call_format=call_format, vocab_size=vocab,
                                          stop_token_ids=stops)
    natural = len(write_with_budget(make(), tok, 200, want))
    # one token more than the JSON case: the plan closes a string with '"' then ',' where this writer's tokenizer
    # may merge them ('",'), so it may count one token too many
    spare = GrammarConstraint.closing_margin + 1
    parsed = parse_output(decode(tok, write_with_budget(make(), tok, natural + spare, want), stops), call_format)
    assert [c["args"] for c in parsed.tool_calls] == [args]
    shortest = len(write_with_budget(make(), tok, 200, want.replace("Nantucket, MA", "").replace("3", "0")))
    for budget in range(shortest + 1, natural):
        parsed = parse_output(decode(tok, write_with_budget(make(), tok, budget, want), stops), call_format)
        assert len(parsed.tool_calls) == 1 and not parsed.invalid_tool_calls, (budget, parsed)
        jsonschema.validate(parsed.tool_calls[0]["args"], BUDGET_SCHEMAS["get_weather"])


def test_a_forced_call_on_the_trained_checkpoint_keeps_its_argument_at_a_tight_budget():
    """The case that showed the fixed window's cost: with the call 33 tokens long, ``max_tokens=40`` wrote
    ``get_weather(city='')``; the city now fits, as it does at 256."""
    from langchain_core.tools import tool

    from jamba_core.testing import trained_checkpoint
    from langchain_jamba import ChatJamba

    trained = trained_checkpoint(missing_ok=True)
    if trained is None:
        pytest.skip("no trained checkpoint")

    @tool
    def get_weather(city: str) -> str:
        """Get the weather in a city."""
        return "sunny"

    calls = {}
    for budget in (40, 256):
        llm = ChatJamba(model=str(trained), max_tokens=budget).bind_tools([get_weather], tool_choice="any")
        calls[budget] = llm.invoke("Weather in Paris?").tool_calls[0]["args"]
    assert calls[40] == calls[256] == {"city": "Paris"}


def script_with_budget(constraint, tok, budget: int, script: list[int]) -> list[int]:
    """`drive` a model that insists on ``script``'s tokens in order (then on nothing)."""

    def model(step, ids):
        logits = torch.zeros(len(tok) + PAD_IDS)
        if step < len(script):
            logits[script[step]] = 50.0
        return logits

    return drive(constraint, tok, budget, model)


@pytest.mark.parametrize("case", ["escaped quote", "bracket inside a string", "optional key"])
def test_the_closing_plan_survives_text_that_looks_like_its_own(tok, vocab, stops, case):
    """The plan is kept across text inside a string only: an escaped quote, or a ``]`` written inside an
    array's string, is not the closer the plan meant (both once dropped the plan's closer and ran past the
    budget); a walk that probes ahead leaves the mask it plans on intact (a clobbered one made every step
    of the last 64 strict, and cut ``123456`` to ``1`` at a budget of 60)."""
    enc = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    if case == "escaped quote":
        schema = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}
        budgets = range(12, 20)
        script = lambda budget: enc('{"s": "') + enc("\\") + enc('"') + enc("a") * (budget - 13) + enc("\\")  # noqa: E731
    elif case == "bracket inside a string":
        schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"}}}, "required": ["a"]}
        budgets = range(10, 16)
        script = lambda budget: enc('{"a": [') + enc('"') + enc("]") + enc("a") * 30  # noqa: E731
    else:
        schema = {"type": "object", "properties": {"a": {"type": "integer"}, "opt": {"type": "integer"},
                                                   "req": {"type": "integer"}}, "required": ["a", "req"]}
        want = '{"a": 123456, "req": 7}'
        ids = write_with_budget(response_format_constraint(tok, {"type": "json_schema", "json_schema": {"schema": schema}},
                                                           vocab_size=vocab, stop_token_ids=stops), tok, 60, want)
        assert decode(tok, ids, stops) == want
        return
    for budget in budgets:
        constraint = response_format_constraint(tok, {"type": "json_schema", "json_schema": {"schema": schema}},
                                                vocab_size=vocab, stop_token_ids=stops)
        ids = script_with_budget(constraint, tok, budget, script(budget))
        jsonschema.validate(json.loads(decode(tok, ids, stops)), schema)


CHOICE_TOOLS = [
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "lookup_the_customer_record", "parameters": {
        "type": "object", "properties": {"customer_id": {"type": "integer"}}, "required": ["customer_id"]}}},
]


@pytest.mark.parametrize("case", ["tool name", "optional key", "space before the call"])
def test_a_choice_with_no_forced_text_takes_the_branch_that_fits(tok, vocab, stops, case):
    """Where branches part without forced text between them (two tool names, an optional key before a
    required one, the template's optional space before ``<tool_calls>``), the plan walks the shortest
    branch, and the model's pick is masked where closing would not fit after it. The plan once took the
    first shortest token (``"opt"``), and the window left the model free at the name: a model that wants
    the longer branch ran out at budgets from the shorter branch's length up to its own (25-40% of random
    walks at +5..+20 tokens; 10 of 20 at the exact minimum with the space)."""
    if case == "optional key":
        schema = {"type": "object", "properties": {"a": {"type": "integer"}, "opt": {"type": "integer"},
                                                   "req": {"type": "integer"}}, "required": ["a", "req"]}
        make = lambda: response_format_constraint(tok, {"type": "json_schema", "json_schema": {"schema": schema}},  # noqa: E731
                                                  vocab_size=vocab, stop_token_ids=stops)
        want, short = '{"a": 12, "opt": 345, "req": 6}', '{"a": 0, "req": 0}'
        valid = lambda text: jsonschema.validate(json.loads(text), schema)  # noqa: E731
    else:
        make = lambda: tool_choice_constraint(tok, CHOICE_TOOLS, "any", call_format="jamba", vocab_size=vocab,  # noqa: E731
                                              stop_token_ids=stops)
        call = lambda name, args: f'<tool_calls>[\n    {json.dumps({"name": name, "arguments": args})}\n]</tool_calls>'  # noqa: E731
        want = call("lookup_the_customer_record", {"customer_id": 1234})
        short = call("now", {})
        if case == "space before the call":
            want = " " + short

        def valid(text):
            parsed = parse_output(text, "jamba")
            assert len(parsed.tool_calls) == 1 and not parsed.invalid_tool_calls, parsed

    natural = len(write_with_budget(make(), tok, 200, want))
    shortest = len(write_with_budget(make(), tok, 200, short))
    assert shortest < natural
    for budget in range(shortest, natural + 2):
        valid(decode(tok, write_with_budget(make(), tok, budget, want), stops))
    assert decode(tok, write_with_budget(make(), tok, natural + GrammarConstraint.closing_margin, want), stops) == want
    for seed in range(10):  # random models: the budget's last tokens hold both branches' choice
        for budget in (shortest, shortest + 5, shortest + 15):
            valid(decode(tok, walk_with_budget(make(), tok, budget, seed, torch.zeros(vocab)), stops))


def test_tools_with_auto_choice_and_a_response_format_allow_a_call_or_the_answer(tok, vocab, stops):
    """LangChain's agents bind tools and a response format together (as OpenAI takes them): the output is
    a tool call or the JSON answer. Only the JSON grammar applied, so an agent never called its tools."""
    from jamba_core.chat.grammar import EitherConstraint

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    make = lambda: EitherConstraint(  # noqa: E731
        tool_choice_constraint(tok, BUDGET_TOOLS, "required", vocab_size=vocab, stop_token_ids=stops),
        response_format_constraint(tok, {"type": "json_schema", "json_schema": {"schema": schema}}, vocab_size=vocab,
                                   stop_token_ids=stops))
    call = '<tool_calls>[\n    {"name": "add", "arguments": {"a": 1, "b": 2}}\n]</tool_calls>'
    parsed = parse_output(decode(tok, write_with_budget(make(), tok, 100, call), stops), "jamba")
    assert [(c["name"], c["args"]) for c in parsed.tool_calls] == [("add", {"a": 1, "b": 2})]
    for answer in ('{"city": "Paris"}', ' {"city": "Paris"}'):  # a leading space fits both until the next token
        assert json.loads(decode(tok, write_with_budget(make(), tok, 100, answer), stops)) == {"city": "Paris"}
    for seed in range(10):  # random models end in one or the other, within the budget
        text = decode(tok, walk_with_budget(make(), tok, 60, seed, torch.zeros(vocab)), stops)
        if "<tool_calls>" in text:
            assert parse_output(text, "jamba").tool_calls
        else:
            jsonschema.validate(json.loads(text), schema)
    with pytest.raises(ValueError, match="neither tool calls nor the response format"):
        make().accept(tok.convert_tokens_to_ids("]"))


def test_chat_with_tools_and_a_response_format_ends_in_a_call_or_the_answer(tiny_engine):
    from jamba_core.chat.api import _constraint, chat
    from jamba_core.chat.grammar import EitherConstraint

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}
    assert isinstance(_constraint(tiny_engine, BUDGET_TOOLS, "auto", fmt), EitherConstraint)
    assert not isinstance(_constraint(tiny_engine, BUDGET_TOOLS, "none", fmt), EitherConstraint)
    for seed in range(4):
        result = chat(tiny_engine, [{"role": "user", "content": "Weather in Paris?"}], tools=BUDGET_TOOLS, response_format=fmt,
                      max_new_tokens=80, temperature=1.0, seed=seed)
        if result.tool_calls:
            assert not result.invalid_tool_calls and result.tool_calls[0]["name"] in BUDGET_SCHEMAS
        else:
            jsonschema.validate(json.loads(result.content), schema)


def test_a_response_format_holds_with_tool_choice_none(tiny_engine):
    """tool_choice="none" only banned the call markers, and the response format was dropped."""
    from jamba_core.chat.api import chat

    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    result = chat(tiny_engine, [{"role": "user", "content": "Weather in Paris?"}], tools=BUDGET_TOOLS, tool_choice="none",
                  response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}, max_new_tokens=80)
    assert not result.tool_calls
    jsonschema.validate(json.loads(result.content), schema)


def test_a_structure_longer_than_the_window_is_planned_from_far_enough_back(tok, vocab, stops):
    """Planning began 64 tokens before the budget's end whatever the structure: a random model that spent
    the slack early in an object whose shortest form is over 64 tokens ran out (all of 10 walks, at
    budgets up to its minimum + 60). The window now starts at the shortest form + 64 tokens."""
    props = {f"field_number_{i}_of_the_record": {"type": "string"} for i in range(6)}
    schema = {"type": "object", "properties": props, "required": list(props)}
    make = lambda: response_format_constraint(tok, {"type": "json_schema", "json_schema": {"schema": schema}},  # noqa: E731
                                              vocab_size=vocab, stop_token_ids=stops)
    shortest = len(write_with_budget(make(), tok, 400, json.dumps({k: "" for k in props})))
    assert shortest > GrammarConstraint.last_item_window
    for seed in range(3):
        for budget in (shortest, shortest + 40):
            jsonschema.validate(json.loads(decode(tok, walk_with_budget(make(), tok, budget, seed, torch.zeros(vocab)), stops)), schema)
