"""Tool-call and citation parsing: whole outputs, malformed ones, and streaming over any splitting."""

import json

import jinja2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from jamba_core.chat.tool_calls import (
    CALL_MARKERS,
    Citations,
    ContentDelta,
    InvalidToolCall,
    StreamingToolCallParser,
    ToolCallChunk,
    ToolCallParser,
    detect_call_format,
    parse_output,
)

FORMATS = ("jamba", "hermes")
ALL_MARKERS = ("<tool_calls>", "</tool_calls>", "<tool_call>", "</tool_call>", "<citations>", "</citations>")


def calls_of(parsed):
    return [(c["name"], c["args"]) for c in parsed.tool_calls]


def stream(text, cuts, call_format="jamba"):
    """Feed ``text`` split at ``cuts``; return (events, parser)."""
    parser, events, last = StreamingToolCallParser(call_format), [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        events += parser.feed(text[last:cut])
        last = cut
    events += parser.finish()
    return events, parser


def assemble(events):
    """(content, {index: (name, args text)}, {index: invalid event}, citations) from stream events."""
    content, calls, invalid, citations = "", {}, {}, []
    for event in events:
        if isinstance(event, ContentDelta):
            content += event.text
        elif isinstance(event, ToolCallChunk):
            if event.index not in calls:
                assert event.id and event.id.startswith("call_") and event.name, event
                calls[event.index] = [event.name, ""]
            else:
                assert event.id is None and event.name is None, "id and name are sent once"
            calls[event.index][1] += event.args_delta
        elif isinstance(event, InvalidToolCall):
            invalid[event.index] = event
        else:
            citations += event.citations
    return content, calls, invalid, citations


def jamba_block(calls, indent=None, separators=None, ensure_ascii=False):
    body = json.dumps(calls, indent=indent, separators=separators, ensure_ascii=ensure_ascii)
    return "<tool_calls>" + body + "</tool_calls>"


# -- whole outputs -------------------------------------------------------------------------------------


def test_plain_text_is_content_stripped():
    parsed = parse_output(" Hello, world.\n")
    assert parsed.content == "Hello, world." and not parsed.tool_calls and not parsed.invalid_tool_calls


def test_jamba_calls_after_text_are_parsed_with_content_before():
    text = ' Let me check.<tool_calls>[\n    {"name": "get_weather", "arguments": {"city": "Paris"}},\n' \
           '    {"name": "get_time", "arguments": {"tz": "CET"}}\n]</tool_calls>'
    parsed = parse_output(text)
    assert parsed.content == "Let me check."
    assert calls_of(parsed) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert parsed.invalid_tool_calls == []


def test_jamba_output_rendered_by_the_fixture_template_round_trips(shared_dir):
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(ValueError(message))
    source = (shared_dir / "fixtures" / "jamba-1.7-chat-template.jinja").read_text()
    template = env.from_string(source)
    calls = [{"name": "search", "arguments": {"query": "白鯨 🐋", "filters": {"year": [1851, 1852]}}},
             {"name": "now", "arguments": {}}]
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Searching.",
                 "tool_calls": [{"type": "function", "function": c} for c in calls]}]
    rendered = template.render(messages=messages, bos_token="<|startoftext|>", add_generation_prompt=False)
    output = rendered.split("<|assistant|>", 1)[1].rsplit("<|eom|>", 1)[0]  # what the model generates
    parsed = parse_output(output, detect_call_format(source, []))
    assert parsed.content == "Searching."
    assert calls_of(parsed) == [(c["name"], c["arguments"]) for c in calls]


def test_arguments_given_as_a_json_string_are_decoded_to_objects():
    args = {"a": [1, {"b": None}], "c": {"d": "e"}}
    parsed = parse_output(jamba_block([{"name": "f", "arguments": json.dumps(args)}]))
    assert calls_of(parsed) == [("f", args)]
    assert isinstance(parsed.tool_calls[0]["args"]["c"], dict)


def test_nested_objects_and_arrays_are_objects_never_strings():
    args = {"filter": {"and": [{"field": "x", "in": [1, 2.5, "三"]}, {"not": {"eq": True}}]}, "limit": None}
    parsed = parse_output(jamba_block([{"name": "query", "arguments": args}], indent=2))
    assert calls_of(parsed) == [("query", args)]
    assert isinstance(parsed.tool_calls[0]["args"]["filter"]["and"], list)


@pytest.mark.parametrize("ensure_ascii", [False, True])
def test_unicode_arguments_are_kept(ensure_ascii):
    args = {"city": "東京", "note": "雨 🌧️ ok", "ko": "서울", "ar": "مرحبا"}
    parsed = parse_output(jamba_block([{"name": "weather", "arguments": args}], ensure_ascii=ensure_ascii))
    assert calls_of(parsed) == [("weather", args)]


def test_each_call_gets_a_unique_id():
    text = jamba_block([{"name": "f", "arguments": {"i": i}} for i in range(5)])
    ids = [c["id"] for c in parse_output(text).tool_calls + parse_output(text).tool_calls]
    assert len(set(ids)) == 10 and all(i.startswith("call_") for i in ids)


def test_missing_arguments_null_or_empty_string_are_empty_objects_and_parameters_is_read():
    text = jamba_block([{"name": "a"}, {"name": "b", "arguments": None}, {"name": "c", "arguments": ""},
                        {"name": "d", "parameters": {"x": 1}}])
    assert calls_of(parse_output(text)) == [("a", {}), ("b", {}), ("c", {}), ("d", {"x": 1})]


def test_name_after_arguments_is_fine():
    parsed = parse_output('<tool_calls>[{"arguments": {"q": "x"}, "name": "search"}]</tool_calls>')
    assert calls_of(parsed) == [("search", {"q": "x"})]


def test_closing_marker_missing_but_json_complete_is_a_call():
    parsed = parse_output('Sure.<tool_calls>[{"name": "f", "arguments": {"a": 1}}]')
    assert parsed.content == "Sure." and calls_of(parsed) == [("f", {"a": 1})] and not parsed.invalid_tool_calls


def test_generation_cut_off_inside_a_call_is_invalid_with_its_raw_text():
    parsed = parse_output('<tool_calls>[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": ')
    assert calls_of(parsed) == [("f", {"a": 1})]
    [bad] = parsed.invalid_tool_calls
    # cut off inside its arguments: those, as a stream sent them (the whole object once went back into the
    # history as the arguments: '{"name": "g", "arguments": {"name": "g", ...')
    assert bad["name"] == "g" and bad["args"] == '{"b": ' and "incomplete" in bad["error"]
    assert bad["id"].startswith("call_")


@pytest.mark.parametrize("body, name, raw", [
    ('[{"name": "f", "arguments": {"a": 1}]', "f", '{"name": "f", "arguments": {"a": 1}]'),  # mismatched bracket
    ('[{"name": "f", "arguments": {"a": 1,}}]', "f", '{"name": "f", "arguments": {"a": 1,}}'),  # trailing comma
    ('[{"name": "f" "arguments": {}}]', None, '{"name": "f" "arguments": {}}'),  # missing colon
    ("not json at all", None, "not json at all"),
    ('[{"arguments": {"a": 1}}]', None, '{"arguments": {"a": 1}}'),  # no name
    ('[{"name": "f", "arguments": [1, 2]}]', "f", '{"name": "f", "arguments": [1, 2]}'),  # not an object
    ('[{"name": "f", "arguments": "{oops"}]', "f", '{"name": "f", "arguments": "{oops"}'),  # bad JSON string
    ("", None, ""),  # empty block
])
def test_malformed_calls_are_invalid_entries_never_exceptions(body, name, raw):
    parsed = parse_output("Text <tool_calls>" + body + "</tool_calls> after")
    assert parsed.tool_calls == []
    [bad] = parsed.invalid_tool_calls
    assert bad["args"] == raw and bad["error"] and bad["id"].startswith("call_")
    assert bad["name"] == name or (name is None and bad["name"] in (None, "f"))
    assert parsed.content == "Text  after"


def test_a_bad_call_does_not_spoil_the_good_ones_before_it():
    parsed = parse_output('<tool_calls>[{"name": "ok", "arguments": {}}, {"name": "bad", "arguments": 3}]</tool_calls>')
    assert calls_of(parsed) == [("ok", {})]
    assert [b["name"] for b in parsed.invalid_tool_calls] == ["bad"]


def test_marker_text_inside_a_json_string_is_data():
    args = {"html": "</tool_calls> <tool_calls> <citations>"}
    assert calls_of(parse_output(jamba_block([{"name": "f", "arguments": args}]))) == [("f", args)]


def test_stray_closing_marker_never_reaches_content():
    assert parse_output("a</tool_calls>b").content == "ab"
    assert parse_output("a</tool_call>b", "hermes").content == "ab"


@pytest.mark.parametrize("call_format", FORMATS)
def test_without_tools_a_call_block_is_content_and_citations_still_parse(call_format):
    """No tools offered (or tool_choice="none"): what looks like a call is the model's text, kept whole."""
    open_, close = CALL_MARKERS[call_format]
    text = f'See {open_}[{{"name": "f", "arguments": {{}}}}]{close} here<citations>[0]</citations>'
    for cuts in ([], [3, 9, 17, 30]):
        parser = StreamingToolCallParser(call_format, tool_calls=False)
        events, last = [], 0
        for cut in [*cuts, len(text)]:
            events += parser.feed(text[last:cut])
            last = cut
        events += parser.finish()
        parsed = parser.result()
        assert parsed.tool_calls == [] and parsed.invalid_tool_calls == []
        assert parsed.content == text.split("<citations>")[0] and parsed.citations == [0]
        assert not any(isinstance(e, (ToolCallChunk, InvalidToolCall)) for e in events)


def test_partial_marker_at_the_end_is_content():
    assert parse_output("x < y and <tool_c").content == "x < y and <tool_c"


def test_hermes_several_calls_and_text_before():
    text = 'Checking both.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "b", "arguments": {"y": ["東", 2]}}\n</tool_call>'
    parsed = parse_output(text, "hermes")
    assert parsed.content == "Checking both."
    assert calls_of(parsed) == [("a", {"x": 1}), ("b", {"y": ["東", 2]})]


def test_hermes_cut_off_call_is_invalid():
    parsed = parse_output('<tool_call>\n{"name": "a", "arguments": {"x"', "hermes")
    assert parsed.tool_calls == [] and parsed.invalid_tool_calls[0]["name"] == "a"


def test_jamba_markers_are_text_for_hermes_and_back():
    assert parse_output('<tool_call>{"name": "a"}</tool_call>', "jamba").tool_calls == []
    assert parse_output('<tool_calls>[{"name": "a"}]</tool_calls>', "hermes").tool_calls == []


def test_citations_are_stripped_and_parsed():
    parsed = parse_output(" Ahab hunts the whale.<citations>[0, 2]</citations>")
    assert parsed.content == "Ahab hunts the whale." and parsed.citations == [0, 2]
    assert parse_output("x<citations>['1', '3']</citations>").citations == [1, 3]  # the template's repr
    assert parse_output("x<citations>[]</citations>").citations == []


@pytest.mark.parametrize("text", ["x<citations>[0, two]</citations>", "x<citations>0, 1</citations>",
                                  "x<citations>[-1]</citations>", "x<citations>[0, 1",
                                  "x<citations>[" + "9" * 5000 + "]</citations>"])  # past int()'s 4,300 digits
def test_malformed_citations_stay_in_content_verbatim(text):
    parsed = parse_output(text)
    assert parsed.content == text and parsed.citations == []


@pytest.mark.parametrize("args", ["[" * 5000 + "]" * 5000, '"' + "[" * 5000 + '"', '{"a": ' * 3000 + "1" + "}" * 3000])
def test_arguments_nested_past_what_json_reads_make_an_invalid_call(args):
    """A degenerate loop can write thousands of brackets; Python's json gives up (RecursionError) around a
    thousand levels: the call is invalid, nothing raises, whole or streamed (the string case is valid)."""
    text = 'Sure.<tool_calls>[{"name": "get_weather", "arguments": {"city": ' + args + "}}]</tool_calls>"
    parsed = parse_output(text)
    if args.startswith('"'):
        assert calls_of(parsed) == [("get_weather", {"city": args[1:-1]})]
        return
    assert parsed.content == "Sure." and parsed.tool_calls == []
    assert [c["error"] for c in parsed.invalid_tool_calls] == ["tool-call JSON is nested too deeply to read"]
    content, calls, invalid, _ = assemble(stream(text, range(0, len(text), 997))[0])
    assert content == "Sure." and [e.error for e in invalid.values()] == ["tool-call JSON is nested too deeply to read"]


def test_citations_and_calls_together():
    parsed = parse_output('Answer.<citations>[1]</citations><tool_calls>[{"name": "f", "arguments": {}}]</tool_calls>')
    assert (parsed.content, parsed.citations, calls_of(parsed)) == ("Answer.", [1], [("f", {})])


def test_tool_call_parser_class_wraps_both_paths():
    parser = ToolCallParser("hermes")
    assert calls_of(parser.parse_output('<tool_call>{"name": "a", "arguments": {}}</tool_call>')) == [("a", {})]
    assert isinstance(parser.stream(), StreamingToolCallParser)
    with pytest.raises(ValueError):
        ToolCallParser("xml")


def test_detect_call_format(shared_dir):
    jamba_template = (shared_dir / "fixtures" / "jamba-1.7-chat-template.jinja").read_text()
    assert detect_call_format(jamba_template, []) == "jamba"
    chatml = "{{ '<|im_start|>' }}... <tool_call>\\n{\"name\": ...}\\n</tool_call>"
    assert detect_call_format(chatml, {"<tool_calls>": 5}) == "hermes"  # the template decides
    assert detect_call_format(None, {"<tool_call>": 7, "a": 8}) == "hermes"
    assert detect_call_format(None, ["<tool_calls>", "</tool_calls>"]) == "jamba"
    assert detect_call_format("{{ messages }}", []) == "jamba"


# -- streaming -----------------------------------------------------------------------------------------


def test_marker_prefix_is_held_back_until_disambiguated():
    parser = StreamingToolCallParser()
    assert parser.feed("Hello <tool_c") == [ContentDelta("Hello")]
    events = parser.feed('alls>[{"name": "f", "arguments": {"a": 1}}]</tool_calls>') + parser.finish()
    assert all(not isinstance(e, ContentDelta) for e in events)
    parser = StreamingToolCallParser()
    assert parser.feed("a <tool_c") == [ContentDelta("a")]
    assert parser.feed("hest") == [ContentDelta(" <tool_chest")]


def test_streamed_chunks_send_id_and_name_first_then_argument_fragments():
    text = '<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]</tool_calls>'
    events, _ = stream(text, range(len(text)))
    chunks = [e for e in events if isinstance(e, ToolCallChunk)]
    assert chunks[0].name == "get_weather" and chunks[0].id and chunks[0].index == 0
    assert all(c.id is None and c.name is None for c in chunks[1:]) and len(chunks) > 5
    assert json.loads("".join(c.args_delta for c in chunks)) == {"city": "Paris", "days": 3}


def test_no_argument_call_before_a_call_with_arguments():
    text = '<tool_calls>[{"name": "now"}, {"name": "add", "arguments": {"a": 1, "b": [2]}}]</tool_calls>'
    for cuts in ([], range(len(text)), [13, 14, 30, 31, 50]):
        _, calls, invalid, _ = assemble(stream(text, cuts)[0])
        assert not invalid
        got = {i: (n, json.loads(a)) for i, (n, a) in calls.items()}
        assert got == {0: ("now", {}), 1: ("add", {"a": 1, "b": [2]})}


def test_invalid_call_is_reported_on_its_stream_index():
    text = 'x<tool_calls>[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": 2]}]</tool_calls>'
    events, parser = stream(text, range(len(text)))
    _, calls, invalid, _ = assemble(events)
    assert set(calls) == {0, 1} and set(invalid) == {1} and invalid[1].name == "g"
    whole = parse_output(text)
    assert [b["args"] for b in whole.invalid_tool_calls] == [invalid[1].args]
    assert parser.result().tool_calls[0]["id"] == next(e.id for e in events if isinstance(e, ToolCallChunk))


def test_streaming_result_keeps_the_announced_ids():
    text = jamba_block([{"name": "f", "arguments": {}}, {"name": "g", "arguments": {"x": 1}}])
    events, parser = stream(text, [5, 20, 40])
    announced = [e.id for e in events if isinstance(e, ToolCallChunk) and e.id]
    assert [c["id"] for c in parser.result().tool_calls] == announced


def test_feed_after_finish_raises_and_result_needs_finish():
    parser = StreamingToolCallParser()
    with pytest.raises(RuntimeError):
        parser.result()
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


# -- property-based: random payloads, random splittings ------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8) | \
    st.sampled_from(["東京", "🐋🌧️", "서울"])
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
args_strategy = st.dictionaries(st.text(max_size=6), json_values, max_size=4)
names = st.text(min_size=1, max_size=12) | st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True)
prose = st.lists(st.text(max_size=3) | st.sampled_from(["<", "<tool", "</", "<cit", " ", "\n"]),
                 max_size=8).map("".join)


@st.composite
def outputs(draw, call_format):
    """(text, expected content, expected [(name, args)], expected citations) in a model's own layout."""
    calls = draw(st.lists(st.tuples(names, args_strategy), max_size=3))
    before, after = draw(prose), draw(prose)
    assume(not any(m in before + after for m in ALL_MARKERS))
    layout = draw(st.sampled_from([dict(ensure_ascii=False), dict(indent=2, ensure_ascii=False),
                                   dict(separators=(",", ":"), ensure_ascii=False), dict(ensure_ascii=True)]))
    as_string = draw(st.booleans())

    def call_obj(name, args):
        obj = {"name": name, "arguments": json.dumps(args, ensure_ascii=False) if as_string else args}
        return obj if not draw(st.booleans()) else {"arguments": obj["arguments"], "name": name}

    open_, close = CALL_MARKERS[call_format]
    if not calls:
        block = ""
    elif call_format == "jamba":
        block = open_ + json.dumps([call_obj(n, a) for n, a in calls], **layout) + \
            (close if draw(st.booleans()) else "")  # the closing marker may be cut off
    else:
        block = "".join(open_ + "\n" + json.dumps(call_obj(n, a), **layout) + "\n" + close for n, a in calls)
    citations = draw(st.lists(st.integers(0, 50), max_size=3))
    cite = "<citations>" + json.dumps(citations) + "</citations>" if citations else ""
    text = before + cite + block + (after if not calls or block.endswith(close) else "")
    content = (before + (after if not calls or block.endswith(close) else "")).strip()
    return text, content, calls, citations


@st.composite
def split(draw, text):
    cuts = draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    return text, cuts


def check_stream_matches(text, cuts, content, calls, citations, call_format):
    whole = parse_output(text, call_format)
    assert whole.content == content
    assert calls_of(whole) == [(n, a) for n, a in calls]
    assert whole.citations == citations and whole.invalid_tool_calls == []
    events, parser = stream(text, cuts, call_format)
    got_content, got_calls, invalid, got_citations = assemble(events)
    assert got_content == whole.content
    assert not invalid and got_citations == whole.citations
    assert sorted(got_calls) == list(range(len(whole.tool_calls)))
    for index, call in enumerate(whole.tool_calls):
        name, args_text = got_calls[index]
        assert name == call["name"] and json.loads(args_text) == call["args"]
    assert not any(m in e.text for e in events if isinstance(e, ContentDelta) for m in ALL_MARKERS)
    assert calls_of(parser.result()) == calls_of(whole)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), call_format=st.sampled_from(FORMATS))
def test_any_splitting_streams_the_whole_parse(data, call_format):
    text, content, calls, citations = data.draw(outputs(call_format))
    _, cuts = data.draw(split(text))
    check_stream_matches(text, cuts, content, calls, citations, call_format)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), call_format=st.sampled_from(FORMATS))
def test_one_char_and_whole_output_deltas_stream_the_whole_parse(data, call_format):
    text, content, calls, citations = data.draw(outputs(call_format))
    check_stream_matches(text, range(len(text)), content, calls, citations, call_format)
    check_stream_matches(text, [], content, calls, citations, call_format)


garbage_pieces = st.sampled_from(["<tool_calls>", "</tool_calls>", "<tool_call>", "</tool_call>", "<citations>",
                                  "</citations>", "<tool_c", "[", "]", "{", "}", '"name"', '"arguments"', ":", ",",
                                  '"f"', '"', "\\", "1", "[0]", " ", "\n", "null", "<", "東"]) | st.text(max_size=3)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), call_format=st.sampled_from(FORMATS))
def test_garbage_never_raises_and_streams_consistently(data, call_format):
    text = "".join(data.draw(st.lists(garbage_pieces, max_size=30)))
    _, cuts = data.draw(split(text))
    whole = parse_output(text, call_format)
    events, parser = stream(text, cuts, call_format)
    streamed = parser.result()
    strip_ids = lambda items: [{k: v for k, v in item.items() if k != "id"} for item in items]  # noqa: E731
    assert streamed.content == whole.content and streamed.citations == whole.citations
    assert strip_ids(streamed.tool_calls) == strip_ids(whole.tool_calls)
    assert strip_ids(streamed.invalid_tool_calls) == strip_ids(whole.invalid_tool_calls)
    content, calls, invalid, _ = assemble(events)
    assert content == whole.content
    for index, (name, args_text) in calls.items():  # every valid index streams parseable arguments
        if index not in invalid:
            json.loads(args_text)
    assert len(calls.keys() - invalid.keys()) == len(whole.tool_calls)
    assert len(invalid) == len(whole.invalid_tool_calls)
    assert all(isinstance(e, (ContentDelta, ToolCallChunk, InvalidToolCall, Citations)) for e in events)


# -- a reasoning model's thinking (jamba_core.chat.reasoning) -------------------------------------------------
REASONING_CASES = [
    ("<think>\nLet me think.  About it.\n</think>\n\nThe answer is 4.", False, "Let me think.  About it.", "\n\nThe answer is 4."),
    ("  <think> a  b </think>x", False, "a  b", "x"),
    ("Plain answer, then <think> as text", False, "", "Plain answer, then <think> as text"),
    ("<thi", False, "", "<thi"),
    ("<think>cut off mid thought <", False, "cut off mid thought <", ""),  # the budget ran out while thinking
    ("The template opened it.\n</think>\nAnswer <tool_call>{}</tool_call>", True, "The template opened it.",
     "\nAnswer <tool_call>{}</tool_call>"),
    ("<think></think>  ", False, "", "  "),
]


@pytest.mark.parametrize("text, opened, reasoning, answer", REASONING_CASES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=12))
def test_reasoning_splits_the_same_however_the_text_is_streamed(text, opened, reasoning, answer, cuts):
    from jamba_core.chat.reasoning import ReasoningSplitter, split_reasoning

    assert split_reasoning(text, opened) == (reasoning, answer)
    splitter, parts, start = ReasoningSplitter(opened), [], 0
    for cut in sorted(c for c in cuts if c <= len(text)) + [len(text)]:
        parts += splitter.feed(text[start:cut])
        start = cut
    parts += splitter.finish()
    assert "".join(t for k, t in parts if k == "reasoning") == reasoning and "".join(t for k, t in parts if k == "answer") == answer
    assert all(t for _, t in parts)  # no empty events


def test_reasoning_templates_and_prompts_that_open_thinking_are_recognised():
    from jamba_core.chat.reasoning import is_reasoning_template, prompt_opens_thinking

    assert is_reasoning_template("{{ '<think>' }}") and is_reasoning_template({"default": "x", "tool_use": "<think>"})
    assert not is_reasoning_template("{{ messages }}") and not is_reasoning_template(None)
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n") and not prompt_opens_thinking("<|im_start|>assistant\n")
