"""Our Jamba chat template against AI21's (the shared fixture), and render_chat's normalisation."""

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError

from jamba_core.chat import JAMBA_CHAT_TEMPLATE, count_chat_tokens, render_chat
from jamba_core.tokenizer import shared_dir, train_tokenizer

SHARED = shared_dir()  # $JAMBA_LOCAL_SHARED, else ../shared: where the library itself looks
FIXTURE = SHARED / "fixtures" / "jamba-1.7-chat-template.jinja"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_file(), reason="../shared/fixtures is absent")

# The check string from ../shared/fixtures/README.md.
README_CHECK = ("<|startoftext|><|bom|><|system|> Sys.<|eom|><|bom|><|user|> Hi<|eom|>"
                "<|bom|><|assistant|>")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


def render(tok, template, messages, **kwargs):
    kwargs.setdefault("add_generation_prompt", True)
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def assert_same_as_fixture(tok, messages, **kwargs):
    ours = render(tok, JAMBA_CHAT_TEMPLATE, messages, **kwargs)
    assert ours == render(tok, FIXTURE.read_text(), messages, **kwargs)
    return ours


SYS, USER = {"role": "system", "content": "You are Jamba."}, {"role": "user", "content": "Hi there"}
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
DOCS = [{"title": "Whales", "text": "Sperm whales dive deep."}, {"text": "Untitled text."},
        {"title": "Ahab", "text": "A captain.", "source": "Moby-Dick", "year": 1851, "page_no": [1, 2]}]
CALL_ARGS = {"city": "Nantucket", "days": 3, "units": ["C"]}
ASSISTANT_CALLS = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": CALL_ARGS}},
    {"name": "get_weather", "arguments": json.dumps({"city": "Bedford"}, separators=(",", ":"))}]}
TOOL_RESULT = {"role": "tool", "content": '{"temp": 12}', "tool_call_id": "c1"}
CITE_FAST = {"is_set": True, "citation_mode": "fast"}


@needs_fixture
def test_fixture_readme_check_string_renders_from_both_templates(tok):
    assert assert_same_as_fixture(tok, [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Hi"}]) \
        == README_CHECK
    assert render_chat(tok, [{"role": "system", "content": "Sys."}, {"role": "user", "content": "Hi"}]) \
        == README_CHECK


@needs_fixture
@pytest.mark.parametrize("messages", [
    [SYS, USER], [USER], [SYS], [{"role": "system", "content": ""}, USER], [{"role": "system"}, USER],
    [USER, {"role": "assistant", "content": "Hello"}, SYS, USER],
    [{"role": "assistant", "content": "I start."}],
], ids=["system_first", "no_system", "system_only", "empty_system", "system_without_content", "system_later",
        "assistant_only"])
def test_template_matches_fixture_for_system_messages(tok, messages):
    assert_same_as_fixture(tok, messages)


@needs_fixture
@pytest.mark.parametrize("messages, tools", [
    ([SYS, USER], [{"type": "function", "function": WEATHER}]),
    ([SYS, USER], [WEATHER, {"name": "noop", "description": "Does nothing. ✓"}]),
    ([USER], [{"type": "function", "function": WEATHER}]),
    ([{"role": "system", "content": ""}, USER], [WEATHER]),
    ([SYS, USER], []),
], ids=["wrapped", "bare_unicode", "without_system", "empty_system", "empty_list"])
def test_template_matches_fixture_for_tools(tok, messages, tools):
    assert_same_as_fixture(tok, messages, tools=tools)


@needs_fixture
def test_both_templates_reject_non_function_tools(tok):
    for template in (JAMBA_CHAT_TEMPLATE, FIXTURE.read_text()):
        with pytest.raises(TemplateError, match="only supported tool type"):
            render(tok, template, [USER], tools=[{"type": "retrieval"}])


@needs_fixture
@pytest.mark.parametrize("messages", [
    [SYS, USER], [USER, {"role": "assistant", "content": "Yes?"}, USER, {"role": "assistant", "content": "Ok"}],
    [{"role": "assistant", "content": "No user yet"}], [SYS],
], ids=["one_user", "before_last_user", "no_user", "no_turns"])
@pytest.mark.parametrize("knobs", [None, CITE_FAST, {"is_set": True, "response_format": "json_object"},
                                   {"is_set": True, "citation_mode": "fast", "response_format": "json_object"},
                                   {"is_set": False, "citation_mode": "fast"}],
                         ids=["no_knobs", "citations", "json", "citations_json", "knobs_unset"])
@pytest.mark.parametrize("documents", [None, DOCS, []], ids=["no_docs", "docs", "empty_docs"])
def test_template_matches_fixture_for_documents_and_knobs(tok, messages, knobs, documents):
    kwargs = {} if knobs is None else {"knobs": knobs}
    assert_same_as_fixture(tok, messages, documents=documents, **kwargs)


@needs_fixture
@pytest.mark.parametrize("assistant", [
    ASSISTANT_CALLS,
    {"role": "assistant", "content": "Let me check.", "tool_calls": [{"name": "f", "arguments": {}}]},
    {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": "é"}'}}]},
    {"role": "assistant", "content": "No calls", "tool_calls": []},
], ids=["dict_and_string_arguments", "content_and_call", "string_arguments", "empty_tool_calls"])
def test_template_matches_fixture_for_tool_calls(tok, assistant):
    assert_same_as_fixture(tok, [SYS, USER, assistant, TOOL_RESULT, TOOL_RESULT], tools=[WEATHER])


@needs_fixture
@pytest.mark.parametrize("messages, knobs", [
    ([SYS, {"role": "user", "content": "Hi", "name": "Ishmael"}, {"role": "tool", "content": "r", "name": "f"}],
     None),
    ([USER, {"role": "assistant", "content": "Deep.", "citations": [{"document_id": 0}, {"document_id": 2}]}],
     CITE_FAST),
    ([USER, {"role": "assistant", "content": "Deep.", "citations": []}], CITE_FAST),
    ([USER, {"role": "assistant", "content": "Deep.", "citations": [{"document_id": 1}]}],
     {"is_set": True, "citation_mode": "off"}),
], ids=["names", "citations", "empty_citations", "citation_mode_off"])
def test_template_matches_fixture_for_names_and_citations(tok, messages, knobs):
    assert_same_as_fixture(tok, messages, documents=DOCS, knobs=knobs)


@needs_fixture
@pytest.mark.parametrize("kwargs", [
    {"add_generation_prompt": False}, {"generation_preamble": "Sure,"}, {"generation_preamble": "   "},
    {"generation_preamble": None}, {"role_to_predict": "tool"}, {"bos_token": None},
    {"bom_str": "[B]", "eom_str": "[E]", "default_system_message": "Default."},
], ids=["no_generation_prompt", "preamble", "blank_preamble", "none_preamble", "role_to_predict", "no_bos",
        "custom_markers"])
def test_template_matches_fixture_for_generation_prompt(tok, kwargs):
    assert_same_as_fixture(tok, [USER, {"role": "assistant", "content": "Ok"}, USER], **kwargs)


@needs_fixture
@pytest.mark.parametrize("content", [
    [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}],
    [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:,x"}}], [],
], ids=["text_blocks", "image_block", "empty_list"])
def test_template_matches_fixture_for_list_content(tok, content):
    assert_same_as_fixture(tok, [{"role": "system", "content": content}, {"role": "user", "content": content},
                                 {"role": "assistant", "content": content}])


# Random conversations: every field the template reads, in any order and combination.
texts = st.text(max_size=12)
names = st.text(min_size=1, max_size=8)
content = st.one_of(texts, st.none(), st.lists(st.builds(lambda t: {"type": "text", "text": t}, texts), max_size=2),
                    st.dictionaries(names, texts, max_size=2))
arguments = st.dictionaries(names, st.one_of(texts, st.integers(), st.booleans()), max_size=3)
tool_call = st.one_of(
    st.builds(lambda n, a: {"name": n, "arguments": a}, names, arguments),
    st.builds(lambda n, a: {"id": "x", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}},
              names, arguments))
function = st.builds(lambda n, d: {"name": n, "description": d, "parameters": {"type": "object"}}, names, texts)
tool = st.one_of(function, function.map(lambda f: {"type": "function", "function": f}))
doc_key = st.text(alphabet="abcxyz_- ", min_size=1, max_size=6)
document = st.builds(lambda t, title, extra: {"text": t, **title, **extra}, texts,
                     st.one_of(st.just({}), texts.map(lambda s: {"title": s}), st.just({"title": None})),
                     st.dictionaries(doc_key, st.one_of(texts, st.integers()), max_size=2))
knobs = st.one_of(st.none(), st.fixed_dictionaries({
    "is_set": st.booleans(), "citation_mode": st.sampled_from(["fast", "off"]),
    "response_format": st.sampled_from(["json_object", "text"])}))


@st.composite
def conversations(draw):
    chosen_knobs = draw(knobs)
    messages = []
    for _ in range(draw(st.integers(1, 6))):
        message = {"role": draw(st.sampled_from(["system", "user", "assistant", "tool"])), "content": draw(content)}
        if draw(st.booleans()):
            message["name"] = draw(st.one_of(names, st.none()))
        if message["role"] == "assistant" and draw(st.booleans()):
            message["tool_calls"] = draw(st.lists(tool_call, max_size=3))
        if message["role"] == "assistant" and chosen_knobs is not None and draw(st.booleans()):
            message["citations"] = [{"document_id": i} for i in draw(st.lists(st.integers(0, 5), max_size=3))]
        messages.append(message)
    kwargs = {"tools": draw(st.one_of(st.none(), st.lists(tool, max_size=3))),
              "documents": draw(st.one_of(st.none(), st.lists(document, max_size=3))),
              "add_generation_prompt": draw(st.booleans()),
              "generation_preamble": draw(st.one_of(st.none(), texts))}
    if chosen_knobs is not None:
        kwargs["knobs"] = chosen_knobs
    return messages, kwargs


@needs_fixture
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation=conversations())
def test_template_matches_fixture_for_random_conversations(tok, conversation):
    messages, kwargs = conversation
    assert_same_as_fixture(tok, messages, **kwargs)


# render_chat: what LangChain / LlamaIndex / OpenAI clients send.

def test_render_chat_merges_system_messages_into_one_leading_message(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."},
                {"role": "assistant", "content": "Ok"}, {"role": "developer", "content": "Be kind."},
                {"role": "system", "content": ""}]
    expected = [{"role": "system", "content": "Be brief.\n\nBe kind."}, messages[0], messages[2]]
    assert render_chat(tok, messages) == render(tok, JAMBA_CHAT_TEMPLATE, expected)


def test_render_chat_keeps_consecutive_messages_of_one_role(tok):
    messages = [USER, {"role": "user", "content": "again"}, TOOL_RESULT, TOOL_RESULT]
    assert render_chat(tok, messages) == render(tok, JAMBA_CHAT_TEMPLATE, messages)


def test_render_chat_joins_text_content_blocks(tok):
    blocks = [{"type": "text", "text": "Call me "}, "Ishmael", {"type": "text", "text": "."}]
    assert render_chat(tok, [{"role": "system", "content": blocks}, {"role": "user", "content": blocks}]) == \
        render_chat(tok, [{"role": "system", "content": "Call me Ishmael."},
                          {"role": "user", "content": "Call me Ishmael."}])


def test_render_chat_keeps_non_text_content_blocks_as_json(tok):
    blocks = [{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "data:,x"}}]
    assert json.dumps(blocks, ensure_ascii=False) in render_chat(tok, [{"role": "user", "content": blocks}])


def test_render_chat_renders_every_tool_call_shape_alike(tok):
    shapes = [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}},
        {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"name": "get_weather", "args": {"city": "Oslo"}, "id": "c1", "type": "tool_call"},  # LangChain ToolCall
    ]
    rendered = {render_chat(tok, [USER, {"role": "assistant", "content": None, "tool_calls": [c]}, TOOL_RESULT])
                for c in shapes}
    assert len(rendered) == 1
    text = rendered.pop()
    assert '<|assistant|> <tool_calls>[\n    {"name": "get_weather", "arguments": {"city": "Oslo"}}\n]' \
           '</tool_calls><|eom|><|bom|><|tool|> {"temp": 12}<|eom|>' in text


def test_render_chat_keeps_tool_call_arguments_that_are_not_json(tok):
    call = {"name": "f", "arguments": "not json"}
    assert '"arguments": not json}' in render_chat(tok, [USER, {"role": "assistant", "tool_calls": [call]}])


def test_render_chat_accepts_wrapped_bare_and_python_function_tools(tok):
    def get_weather(city: str):
        """Weather for a city

        Args:
            city: the city
        """

    wrapped = render_chat(tok, [USER], tools=[{"type": "function", "function": WEATHER}])
    assert render_chat(tok, [USER], tools=[WEATHER]) == wrapped
    assert '"name": "get_weather"' in render_chat(tok, [USER], tools=[get_weather])
    assert "<tool_definitions>" in wrapped and json.dumps(WEATHER, indent=2) in wrapped


def test_render_chat_json_object_turns_on_json_mode(tok):
    text = render_chat(tok, [SYS, USER], response_format={"type": "json_object"})
    assert "## JSON Mode" in text and "## Citation Mode" not in text
    assert render_chat(tok, [SYS, USER], response_format={"type": "text"}) == render_chat(tok, [SYS, USER])


def test_render_chat_json_schema_goes_to_the_system_message(tok):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "Answer", "schema": schema}}
    text = render_chat(tok, [USER, SYS], response_format=fmt)
    system = "You are Jamba.\n\nRespond with JSON that follows this JSON schema:\n" + json.dumps(schema, indent=2)
    assert text.startswith("<|startoftext|><|bom|><|system|> " + system + "<|eom|>")
    assert "## JSON Mode" in text
    assert render_chat(tok, [USER], response_format=fmt).startswith("<|startoftext|><|bom|><|system|> Respond")


def test_render_chat_citations_turn_on_citation_mode(tok):
    answer = {"role": "assistant", "content": "Deep.", "citations": [{"document_id": 0}]}
    text = render_chat(tok, [USER, answer, USER], documents=DOCS, citations=True)
    assert "## Citation Mode" in text and "Deep.<citations>[0]</citations><|eom|>" in text
    assert "## Citation Mode" not in render_chat(tok, [USER, answer, USER], documents=DOCS)


def test_parsed_citations_render_back_as_the_template_wants(tok):
    """`parse_output` gives citations as document ids, the template reads ``[{"document_id": i}]``: a
    parsed answer sent back in the conversation rendered ``<citations>[Undefined]</citations>``."""
    from jamba_core.chat import parse_output

    parsed = parse_output("Deep.<citations>[0, 2]</citations>")
    answer = {"role": "assistant", "content": parsed.content, "citations": parsed.citations}
    text = render_chat(tok, [USER, answer, USER], documents=DOCS, citations=True)
    assert "Deep.<citations>[0, 2]</citations><|eom|>" in text
    same = {**answer, "citations": [{"document_id": 0}, {"document_id": 2}]}
    assert render_chat(tok, [USER, same, USER], documents=DOCS, citations=True) == text


def test_documents_the_template_would_drop_are_an_error(tok):
    """Jamba's template puts documents just before the last user message: with none, they were left out
    of the prompt without a word."""
    with pytest.raises(ValueError, match="placed none of the documents.*last user message"):
        render_chat(tok, [{"role": "system", "content": "Answer from the documents."}], documents=DOCS)
    assert DOCS[0]["text"] in render_chat(tok, [USER], documents=DOCS)


@needs_fixture
@pytest.mark.parametrize("kwargs", [{}, {"citations": True}, {"response_format": {"type": "json_object"}},
                                    {"documents": DOCS, "tools": [WEATHER], "citations": True}])
def test_render_chat_gives_the_same_text_with_the_fixture_template(tok, kwargs):
    # A real checkpoint renders with AI21's template; render_chat must feed it what it needs (knobs included).
    real = copy.copy(tok)
    real.chat_template = FIXTURE.read_text()
    messages = [USER, ASSISTANT_CALLS, TOOL_RESULT, {"role": "system", "content": "Late system."},
                {"role": "assistant", "content": "Deep.", "citations": [{"document_id": 1}]}, USER]
    assert render_chat(real, messages, **kwargs) == render_chat(tok, messages, **kwargs)


def test_render_chat_uses_our_template_when_the_tokenizer_has_none(tok):
    bare = copy.copy(tok)
    bare.chat_template = None
    assert render_chat(bare, [SYS, USER]) == render_chat(tok, [SYS, USER])


def test_render_chat_does_not_change_its_inputs(tok):
    messages = [USER, copy.deepcopy(ASSISTANT_CALLS), {"role": "system", "content": [{"type": "text", "text": "s"}]}]
    tools, documents = [{"type": "function", "function": WEATHER}], copy.deepcopy(DOCS)
    before = copy.deepcopy((messages, tools, documents))
    render_chat(tok, messages, tools=tools, documents=documents, citations=True)
    assert (messages, tools, documents) == before


@pytest.mark.parametrize("messages, kwargs, match", [
    ([], {}, "at least one"),
    (["hi"], {}, "must be a dict"),
    ([{"role": "narrator", "content": "x"}], {}, "unknown role 'narrator'"),
    ([{"content": "x"}], {}, "unknown role None"),
    ([{"role": "system", "content": [{"type": "image_url"}]}], {}, "text content"),
    ([{"role": "assistant", "tool_calls": [{"arguments": {}}]}], {}, "function name"),
    ([USER], {"tools": [{"type": "code_interpreter"}]}, "only function tools"),
    ([USER], {"tools": [{"description": "no name"}]}, "no function name"),
    ([USER], {"documents": [{"title": "no text"}]}, "'text' string"),
    ([USER], {"response_format": {"type": "xml"}}, "unknown response_format"),
    ([USER], {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
], ids=["empty", "not_dict", "unknown_role", "no_role", "system_image", "call_without_name", "non_function_tool",
        "tool_without_name", "document_without_text", "unknown_response_format", "schema_missing"])
def test_render_chat_rejects_invalid_input(tok, messages, kwargs, match):
    with pytest.raises(ValueError, match=match):
        render_chat(tok, messages, **kwargs)


def test_count_chat_tokens_is_the_exact_encoded_length(tok):
    messages = [SYS, USER, ASSISTANT_CALLS, TOOL_RESULT]
    text = render_chat(tok, messages, tools=[WEATHER], documents=DOCS)
    ids = tok.encode(text, add_special_tokens=False)
    assert count_chat_tokens(tok, messages, tools=[WEATHER], documents=DOCS) == len(ids)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
