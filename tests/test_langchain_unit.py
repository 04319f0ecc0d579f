"""ChatJamba without a model: LangChain's standard unit suite and the private translation functions."""

from __future__ import annotations

import asyncio
import json
import re
import textwrap
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.messages import (  # noqa: E402
    AIMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from langchain_jamba import ChatJamba  # noqa: E402
from langchain_core.messages import AIMessageChunk  # noqa: E402
from langchain_core.utils.json import parse_partial_json  # noqa: E402

from jamba_core.aio import iterate_in_thread as _iterate_in_thread  # noqa: E402
from langchain_jamba.chat_models import (  # noqa: E402
    _context_window_without_loading,
    _convert_documents,
    _convert_message,
    _normalize_response_format,
    _normalize_tool_choice,
    _spoiling_suffix,
    _StreamState,
    _to_ai_message,
    _to_chunk,
)

HUB_ID = "ai21labs/AI21-Jamba-Mini-1.7"  # never downloaded here: building a ChatJamba loads nothing


class TestChatJambaStandardUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatJamba]:
        return ChatJamba

    @property
    def chat_model_params(self) -> dict:
        return {"model": HUB_ID}

    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        return {"JAMBA_LOCAL_MODEL": HUB_ID}, {}, {"model": HUB_ID}


# -- construction ------------------------------------------------------------------------------------
def test_a_misspelt_option_warns_and_max_new_tokens_is_max_tokens(tmp_path, recwarn):
    """pydantic drops unknown options without a word: ChatJamba(max_new_tokens=3) kept 256 tokens."""
    assert ChatJamba(model=tmp_path, max_new_tokens=3).max_tokens == 3  # JambaLLM's and transformers' name
    assert ChatJamba(model=tmp_path, max_tokens=4).max_tokens == 4
    ChatJamba(model=tmp_path, timeout=5, max_retries=1, api_key="x")  # LangChain's standard options: taken
    assert not [w for w in recwarn.list if "no option" in str(w.message)]
    with pytest.warns(UserWarning, match=r"ChatJamba has no option 'temprature'.*did you mean 'temperature'") as caught:
        ChatJamba(model=tmp_path, temprature=0.5)
    assert caught[0].filename == __file__  # the warning names the caller's line


def test_construction_loads_nothing(tmp_path):
    llm = ChatJamba(model=tmp_path / "not-a-checkpoint", max_tokens=8)
    assert llm.model == str(tmp_path / "not-a-checkpoint")
    assert llm._engine is None


def test_missing_model_names_the_environment_variable(monkeypatch):
    monkeypatch.delenv("JAMBA_LOCAL_MODEL", raising=False)
    with pytest.raises(ValueError, match="JAMBA_LOCAL_MODEL"):
        ChatJamba()


def test_model_name_is_an_alias_of_model():
    assert ChatJamba(model_name=HUB_ID).model == HUB_ID


def test_max_tokens_below_one_is_refused():
    with pytest.raises(ValueError, match="max_tokens"):
        ChatJamba(model=HUB_ID, max_tokens=0)


def test_profile_reads_context_window_from_config_without_loading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    llm = ChatJamba(model=str(tmp_path))
    assert llm.profile["max_input_tokens"] == 4096
    assert llm.profile["tool_calling"] and llm.profile["structured_output"] and llm.profile["tool_choice"]
    assert llm.profile["image_inputs"] is False
    assert _context_window_without_loading(str(tmp_path / "absent")) is None


def test_ls_params_name_the_provider_and_honour_overrides():
    llm = ChatJamba(model=HUB_ID, temperature=0.5, max_tokens=12, stop=["x"])
    params = llm._get_ls_params()
    assert params == {"ls_provider": "jamba-local", "ls_model_name": HUB_ID, "ls_model_type": "chat",
                      "ls_temperature": 0.5, "ls_max_tokens": 12, "ls_stop": ["x"]}
    assert llm._get_ls_params(stop=["y"], model="other", max_tokens=3)["ls_stop"] == ["y"]
    assert llm._get_ls_params(model="other")["ls_model_name"] == "other"


def test_unknown_call_argument_is_an_error():
    with pytest.raises(TypeError, match="frequency_penalty"):
        ChatJamba(model=HUB_ID)._request([HumanMessage("hi")], None, {"frequency_penalty": 1.0})


def test_tools_and_tool_choice_given_per_call_are_normalized():
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    params = ChatJamba(model=HUB_ID)._request([HumanMessage("hi")], None, {"tools": [add], "tool_choice": True}).params
    assert params["tools"][0]["function"]["name"] == "add" and params["tool_choice"] == "required"


def test_response_format_classes_become_json_schema_formats():
    class Joke(BaseModel):
        setup: str

    assert _normalize_response_format(None) is None
    assert _normalize_response_format({"type": "json_object"}) == {"type": "json_object"}
    fmt = _normalize_response_format(Joke)
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Joke"
    assert fmt["json_schema"]["schema"]["required"] == ["setup"]


def test_call_arguments_override_fields():
    llm = ChatJamba(model=HUB_ID, temperature=0.3, stop=["a"], citations=False)
    request = llm._request(
        [HumanMessage("hi")], None, {"temperature": 0.0, "documents": ["doc"], "citations": True, "model": "other", "max_tokens": 5})
    assert request.override == request.model_name == "other" and request.max_tokens == 5
    params = request.params
    assert params["temperature"] == 0.0 and params["stop"] == ["a"] and params["citations"] is True
    assert params["documents"] == [{"text": "doc"}] and params["tool_choice"] == "auto"
    assert request.messages == [{"role": "user", "content": "hi"}]
    assert llm._request([HumanMessage("hi")], ["b"], {}).params["stop"] == ["b"]
    assert llm._request([HumanMessage("hi")], None, {}).model_name == HUB_ID


# -- LangChain -> OpenAI-shaped messages --------------------------------------------------------------
def test_system_and_human_messages_with_names_and_text_blocks():
    assert _convert_message(SystemMessage([{"type": "text", "text": "be "}, "brief"])) == {"role": "system", "content": "be brief"}
    assert _convert_message(HumanMessage("hello", name="ann")) == {"role": "user", "content": "hello", "name": "ann"}
    blocks = [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "b"}]
    assert _convert_message(HumanMessage(blocks)) == {"role": "user", "content": "ab"}


def test_non_text_user_blocks_are_kept_for_the_template():
    blocks = [{"type": "text", "text": "a"}, {"type": "json", "json": {"k": 1}}]
    assert _convert_message(HumanMessage(blocks))["content"] == blocks


@pytest.mark.parametrize("block", [
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    {"type": "image", "base64": "AAAA", "mime_type": "image/png"},
    {"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"},
    {"type": "file", "base64": "AAAA", "mime_type": "application/pdf"},
])
def test_media_blocks_are_refused_with_a_clear_error(block):
    with pytest.raises(ValueError, match="text only"):
        _convert_message(HumanMessage([{"type": "text", "text": "look"}, block]))
    with pytest.raises(ValueError, match="text only"):
        _convert_message(ToolMessage([block], tool_call_id="1"))


def test_ai_message_with_tool_calls_becomes_openai_tool_calls():
    msg = AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": "你好"}, "id": "call_1", "type": "tool_call"}])
    out = _convert_message(msg)
    assert out["role"] == "assistant" and out["content"] == ""
    assert out["tool_calls"] == [{"id": "call_1", "type": "function",
                                  "function": {"name": "add", "arguments": '{"a": 1, "b": "你好"}'}}]
    assert json.loads(out["tool_calls"][0]["function"]["arguments"]) == {"a": 1, "b": "你好"}


def test_ai_message_list_content_keeps_text_and_drops_tool_use_and_thinking_blocks():
    msg = AIMessage(
        [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "some text"},
         {"type": "tool_use", "id": "abc", "name": "f", "input": {"x": 1}}],
        tool_calls=[{"name": "f", "args": {"x": 1}, "id": "abc", "type": "tool_call"}],
    )
    out = _convert_message(msg)
    assert out["content"] == "some text"
    assert [c["function"]["name"] for c in out["tool_calls"]] == ["f"]


def test_ai_message_invalid_tool_calls_are_sent_back_as_written():
    msg = AIMessage("", invalid_tool_calls=[{"name": "f", "args": '{"x": ', "id": "c1", "error": "bad", "type": "invalid_tool_call"}])
    assert _convert_message(msg)["tool_calls"] == [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": '}}]


def test_ai_message_citations_round_trip():
    msg = AIMessage("Nantucket.", response_metadata={"citations": [0, 2]})
    assert _convert_message(msg)["citations"] == [0, 2]


def test_tool_message_string_list_and_error_status():
    ok = ToolMessage('{"result": 3}', tool_call_id="abc", name="add")
    assert _convert_message(ok) == {"role": "tool", "content": '{"result": 3}', "tool_call_id": "abc", "name": "add"}
    listed = ToolMessage([{"type": "text", "text": "3"}, {"type": "json", "json": {"r": 3}}], tool_call_id="abc")
    assert _convert_message(listed)["content"] == '3{"type": "json", "json": {"r": 3}}'
    failed = ToolMessage("division by zero", tool_call_id="abc", status="error")
    assert _convert_message(failed)["content"] == "Error: division by zero"
    said = ToolMessage("Error: Missing required argument 'b'.", tool_call_id="abc", status="error")
    assert _convert_message(said)["content"] == "Error: Missing required argument 'b'."


def test_chat_message_roles_are_mapped():
    assert _convert_message(ChatMessage(role="human", content="x"))["role"] == "user"
    assert _convert_message(ChatMessage(role="ai", content="x"))["role"] == "assistant"
    assert _convert_message(ChatMessage(role="system", content="x"))["role"] == "system"


# -- documents -------------------------------------------------------------------------------------------
def test_documents_from_langchain_documents_dicts_and_strings():
    docs = [
        Document("Call me Ishmael.", metadata={"title": "Loomings", "page": 1, "tags": ["a"], "source": "moby.txt"}),
        {"text": "plain", "title": "T"},
        {"page_content": "from a dict"},
        "just text",
    ]
    assert _convert_documents(docs) == [
        {"text": "Call me Ishmael.", "title": "Loomings", "page": 1, "source": "moby.txt"},
        {"text": "plain", "title": "T"},
        {"text": "from a dict"},
        {"text": "just text"},
    ]
    assert _convert_documents(None) is None and _convert_documents([]) is None
    with pytest.raises(ValueError, match="document 0"):
        _convert_documents([3])


# -- tool choice -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice, expected", [
    (None, None), ("auto", "auto"), ("none", "none"), ("any", "any"), ("required", "required"), ("add", "add"),
    (True, "required"), (False, "auto"),
    ({"type": "function", "function": {"name": "add"}}, "add"), ({"type": "tool", "name": "mul"}, "mul"),
    ({"type": "any"}, "any"), ({"type": "auto"}, "auto"),
])
def test_tool_choice_forms(choice, expected):
    assert _normalize_tool_choice(choice, ["add", "mul"]) == expected


def test_tool_choice_naming_no_tool_is_an_error():
    with pytest.raises(ValueError, match="nope"):
        _normalize_tool_choice("nope", ["add"])
    with pytest.raises(ValueError):
        _normalize_tool_choice({"type": "function"}, ["add"])


def test_bind_tools_converts_every_tool_kind_and_binds_the_choice():
    class Multiply(BaseModel):
        """Multiply two integers."""

        a: int = Field(description="first")
        b: int

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    schema = {"title": "divide", "description": "Divide.", "type": "object",
              "properties": {"a": {"type": "number"}}, "required": ["a"]}
    bound = ChatJamba(model=HUB_ID).bind_tools([Multiply, add, schema], tool_choice="add")
    tools = bound.kwargs["tools"]
    assert [t["function"]["name"] for t in tools] == ["Multiply", "add", "divide"]
    assert all(t["type"] == "function" and t["function"]["parameters"]["type"] == "object" for t in tools)
    assert bound.kwargs["tool_choice"] == "add"
    assert "tool_choice" not in ChatJamba(model=HUB_ID).bind_tools([add]).kwargs


def test_with_structured_output_binds_what_each_method_needs():
    class Joke(BaseModel):
        setup: str
        punchline: str

    llm = ChatJamba(model=HUB_ID)
    calling = llm.with_structured_output(Joke).first
    assert calling.kwargs["tool_choice"] == "Joke"
    schema = llm.with_structured_output(Joke, method="json_schema", strict=True).first
    assert schema.kwargs["response_format"]["type"] == "json_schema"
    assert schema.kwargs["response_format"]["json_schema"]["schema"]["required"] == ["setup", "punchline"]
    mode = llm.with_structured_output(Joke, method="json_mode").first
    assert mode.kwargs["response_format"] == {"type": "json_object"}
    with pytest.raises(ValueError, match="method"):
        llm.with_structured_output(Joke, method="xml")


# -- results -> messages -----------------------------------------------------------------------------------
def _result(**overrides):
    usage = SimpleNamespace(prompt_tokens=11, completion_tokens=4, cached_tokens=3)
    timings = SimpleNamespace(time_to_first_token_s=0.5, prefill_s=0.4, decode_s=0.2,
                              prefill_tokens_per_s=27.5, decode_tokens_per_s=15.0)
    fields = dict(content="hi", tool_calls=[], invalid_tool_calls=[], citations=[], finish_reason="stop",
                  usage=usage, timings=timings, text="hi")
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_result_becomes_ai_message_with_usage_and_metadata():
    msg = _to_ai_message(_result(citations=[1]), "my-model")
    assert msg.content == "hi"
    assert msg.usage_metadata == {"input_tokens": 11, "output_tokens": 4, "total_tokens": 15,
                                  "input_token_details": {"cache_read": 3}}
    assert msg.response_metadata == {"model_name": "my-model", "model_provider": "jamba-local", "finish_reason": "stop",
                                     "time_to_first_token": 0.5, "prefill_tokens_per_s": 27.5,
                                     "decode_tokens_per_s": 15.0, "citations": [1], "invalid_tool_calls": []}


def test_result_tool_calls_and_invalid_tool_calls():
    msg = _to_ai_message(_result(
        content="", finish_reason="tool_calls",
        tool_calls=[{"id": "call_a", "name": "add", "args": {"a": 1, "nested": {"b": [2]}}}],
        invalid_tool_calls=[{"id": "call_b", "name": "mul", "args": '{"a": ', "error": "Expecting value"}],
    ), "m")
    assert msg.tool_calls == [{"name": "add", "args": {"a": 1, "nested": {"b": [2]}}, "id": "call_a", "type": "tool_call"}]
    assert msg.invalid_tool_calls == [{"name": "mul", "args": '{"a": ', "id": "call_b", "error": "Expecting value",
                                       "type": "invalid_tool_call"}]
    assert msg.response_metadata["finish_reason"] == "tool_calls"


# -- stream events -> chunks ----------------------------------------------------------------------------
def _events():
    from jamba_core.chat.api import ChatDone, ContentDelta, InvalidToolCall, ToolCallChunk

    return ChatDone, ContentDelta, InvalidToolCall, ToolCallChunk


def _merged(chunks):
    full = None
    for chunk in chunks:
        if chunk is not None:
            full = chunk if full is None else full + chunk
    return full


def test_stream_events_merge_to_the_invoked_message():
    ChatDone, ContentDelta, InvalidToolCall, ToolCallChunk = _events()
    result = _result(content="Let me check.", finish_reason="tool_calls",
                     tool_calls=[{"id": "call_a", "name": "add", "args": {"a": 1, "b": {"c": [2]}}},
                                 {"id": "call_b", "name": "now", "args": {}}])
    state = _StreamState()
    events = [ContentDelta("Let me "), ContentDelta(""), ContentDelta("check."),
              ToolCallChunk(0, "call_a", "add", ""), ToolCallChunk(0, None, None, '{"a": 1, '),
              ToolCallChunk(0, None, None, '"b": {"c": [2]}}'), ToolCallChunk(1, "call_b", "now", ""),
              ToolCallChunk(1, None, None, "{}"), ChatDone(result)]
    chunks = [_to_chunk(e, "m", state) for e in events]
    assert chunks[1] is None  # empty text makes no chunk
    assert [c.chunk_position for c in chunks if c is not None][-1] == "last"
    assert [i for i, c in enumerate(chunks) if c is not None and c.usage_metadata] == [len(chunks) - 1]
    full, whole = _merged(chunks), _to_ai_message(result, "m")
    assert full.content == whole.content
    assert full.tool_calls == whole.tool_calls
    assert full.usage_metadata == whole.usage_metadata and full.response_metadata == whole.response_metadata


def test_streamed_invalid_calls_stay_invalid_after_merging():
    ChatDone, ContentDelta, InvalidToolCall, ToolCallChunk = _events()
    state = _StreamState()
    chunks = [
        # a call cut off after some arguments: LangChain would repair '{"a": 1' into {"a": 1}
        ToolCallChunk(0, "call_a", "add", ""), ToolCallChunk(0, None, None, '{"a": 1'),
        InvalidToolCall(0, "call_a", "add", '{"name": "add", "arguments": {"a": 1', "tool-call JSON is incomplete"),
        # a call announced by name only
        ToolCallChunk(1, "call_b", "now", ""),
        InvalidToolCall(1, "call_b", "now", '{"name": "now"', "tool-call JSON is incomplete"),
        # a call never announced, whose raw text LangChain would also repair into a dict
        InvalidToolCall(2, "call_c", None, '{"nam": "x"}', "no string 'name'"),
        # one whose raw text is plainly not JSON
        InvalidToolCall(3, "call_d", None, "oops", "not JSON"),
    ]
    full = _merged(_to_chunk(e, "m", state) for e in chunks)
    assert full.tool_calls == []
    assert [c["id"] for c in full.invalid_tool_calls] == ["call_a", "call_b", "call_c", "call_d"]
    assert full.invalid_tool_calls[3]["args"] == "oops"


@pytest.mark.parametrize("text", [
    '{"a": 1, "b": [1, 2, {"c": "x\\"y"}], "d": "e\\\\"}',
    '{"s": "brackets ] and } inside", "n": null}',
    '{"nested": {"deep": [[{"k": "v"}]]}}',
    '[1, {"a": "b"}]',
])
def test_spoiling_suffix_defeats_partial_json_repair_for_every_prefix(text):
    for end in range(len(text) + 1):
        prefix = text[:end]
        try:
            repaired = parse_partial_json(prefix + _spoiling_suffix(prefix))
        except ValueError:
            continue
        assert not isinstance(repaired, dict), (prefix, repaired)


def test_unknown_stream_events_are_skipped():
    assert _to_chunk(object(), "m", _StreamState()) is None
    assert isinstance(_to_chunk(_events()[1]("x"), "m", _StreamState()), AIMessageChunk)


# -- the class docstring is the user's manual ------------------------------------------------------------
def test_docstring_has_the_integration_sections_and_its_examples_compile():
    doc = ChatJamba.__doc__
    for section in ("Setup:", "Key init args", "Instantiate:", "Invoke:", "Stream:", "Async:", "Tool calling:",
                    "Structured output:", "JSON mode:", "Token usage:"):
        assert f"\n    {section}" in doc, section
    blocks = [b.split("```", 1)[0] for b in doc.split("```python\n")[1:]]
    code = [textwrap.dedent(b) for b in blocks if "import" in b or "llm" in b or "=" in b]
    assert len(code) >= 10
    for block in code:
        compile(block, "<ChatJamba docstring>", "exec")


# -- the worker-thread bridge -------------------------------------------------------------------------------
def test_iterate_in_thread_yields_in_order_and_keeps_the_loop_free():
    def slow():
        for i in range(5):
            time.sleep(0.05)  # blocking work, as a decode step is
            yield i

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        items = [i async for i in _iterate_in_thread(slow)]
        task.cancel()
        return items, ticks

    items, ticks = asyncio.run(main())
    assert items == [0, 1, 2, 3, 4]
    assert ticks >= 10


def test_iterate_in_thread_reraises_the_workers_error():
    def broken():
        yield 1
        raise KeyError("boom")

    async def main():
        return [i async for i in _iterate_in_thread(broken)]

    with pytest.raises(KeyError, match="boom"):
        asyncio.run(main())


def test_iterate_in_thread_closes_the_iterator_when_the_consumer_stops():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                time.sleep(0.01)
                yield i
                i += 1
        finally:
            closed.set()

    async def main():
        agen = _iterate_in_thread(endless)
        async for i in agen:
            if i == 2:
                break
        await agen.aclose()

    asyncio.run(main())
    assert closed.wait(2.0)


def test_pinned_documents_are_read_from_cache(tiny_checkpoint):
    from langchain_core.messages import HumanMessage, SystemMessage

    from langchain_jamba import ChatJamba

    llm = ChatJamba(model=str(tiny_checkpoint), max_tokens=2)
    docs = [{"title": "Moby-Dick", "text": "Call me Ishmael. " * 60}, {"title": "Notes", "text": "The Pequod. " * 30}]
    system = [SystemMessage("Answer from the documents.")]
    handle = llm.pin(documents=docs, messages=system)
    for question in ("Who is Ishmael?", "What is the Pequod?"):
        usage = llm.invoke([*system, HumanMessage(question)], documents=docs).usage_metadata
        assert usage["input_token_details"]["cache_read"] == len(handle)
        assert usage["input_tokens"] - len(handle) < 20
    llm.release(handle)


def test_structured_output_cut_off_by_max_tokens_says_so(tiny_checkpoint):
    """A forced call or a JSON answer that `max_tokens` cuts off used to come back as None (no valid
    tool call) or as a JSON error that did not say why: now the parse names max_tokens."""
    from langchain_core.exceptions import OutputParserException

    class Joke(BaseModel):
        setup: str
        punchline: str

    for budget in (4, 12):  # 12: '{"setup": "",', which LangChain's JSON parsers would repair into {"setup": ""}
        llm = ChatJamba(model=str(tiny_checkpoint), max_tokens=budget)
        cut = rf"cut off at max_tokens \({budget} tokens generated\).*raise max_tokens"
        for method in ("function_calling", "json_schema"):
            for schema in (Joke, Joke.model_json_schema()):
                with pytest.raises(OutputParserException, match=cut):
                    llm.with_structured_output(schema, method=method).invoke("Tell me a joke")
                out = llm.with_structured_output(schema, method=method, include_raw=True).invoke("Tell me a joke")
                assert out["parsed"] is None and "max_tokens" in str(out["parsing_error"])
                assert out["raw"].response_metadata["finish_reason"] == "length"


def test_a_streamed_structured_answer_ends_as_invoke_ends(tiny_checkpoint):
    """LangChain's cumulative parsers only parse partially, so a stream cut at max_tokens, or whose
    answer fails the schema, used to end quietly with a partial object or with nothing. The last chunk
    is now parsed whole: the stream raises where invoke raises, and yields what invoke returns."""
    from langchain_core.exceptions import OutputParserException

    class Joke(BaseModel):
        setup: str
        punchline: str

    cut = ChatJamba(model=str(tiny_checkpoint), max_tokens=12)
    for method in ("function_calling", "json_schema"):
        for schema in (Joke, Joke.model_json_schema()):
            with pytest.raises(OutputParserException, match=r"cut off at max_tokens \(12 tokens generated\)"):
                list(cut.with_structured_output(schema, method=method).stream("Tell me a joke"))
            with pytest.raises(OutputParserException, match="cut off at max_tokens"):
                asyncio.run(_collect(cut.with_structured_output(schema, method=method).astream("Tell me a joke")))
    # json_mode constrains to any object: the random model's {"Norfromaint": 5} fails Joke on both paths
    whole = ChatJamba(model=str(tiny_checkpoint), max_tokens=12).with_structured_output(Joke, method="json_mode")
    with pytest.raises(OutputParserException, match="Failed to parse Joke"):
        whole.invoke("Tell me a joke")
    with pytest.raises(OutputParserException, match="Failed to parse Joke"):
        list(whole.stream("Tell me a joke"))
    # an answer that fits streams partial objects (dicts: a pydantic parse waits for every field) and
    # ends with what invoke returns
    for schema in (Joke, Joke.model_json_schema()):
        fits = ChatJamba(model=str(tiny_checkpoint), max_tokens=400).with_structured_output(schema, method="json_schema")
        streamed = list(fits.stream("Tell me a joke"))
        assert streamed[-1] == fits.invoke("Tell me a joke")
    assert len(streamed) > 10 and streamed[0] == {}


def test_include_raw_returns_the_parsing_error_when_streamed_too(tiny_checkpoint):
    """``include_raw=True`` promises the error instead of raising: LangChain's fallback catches only
    errors raised before a stream's first chunk, so the stream raised where invoke returned it."""
    class Joke(BaseModel):
        setup: str
        punchline: str

    llm = ChatJamba(model=str(tiny_checkpoint), max_tokens=6)
    for method in ("function_calling", "json_schema"):
        runnable = llm.with_structured_output(Joke, method=method, include_raw=True)
        invoked = runnable.invoke("Tell me a joke")
        for chunks in (list(runnable.stream("Tell me a joke")), asyncio.run(_collect(runnable.astream("Tell me a joke")))):
            assert any("raw" in c for c in chunks)
            assert chunks[-1]["parsed"] is None and "cut off at max_tokens" in str(chunks[-1]["parsing_error"])
        assert invoked["parsed"] is None and "cut off at max_tokens" in str(invoked["parsing_error"])
    whole = ChatJamba(model=str(tiny_checkpoint), max_tokens=400).with_structured_output(Joke, include_raw=True)
    last = list(whole.stream("Tell me a joke"))[-1]
    assert isinstance(last["parsed"], Joke) and last["parsing_error"] is None


def test_a_forced_call_that_does_not_parse_raises_instead_of_returning_none():
    """The tool parsers return None when there is no valid call; a forced call's answer is then an error
    (a stop string once cut the call's framing, and `invoke` returned None)."""
    from langchain_core.exceptions import OutputParserException
    from langchain_core.outputs import ChatGeneration

    from langchain_jamba.chat_models import _JsonOutputKeyToolsParser, _PydanticToolsParser

    class Joke(BaseModel):
        setup: str

    broken = AIMessage("", invalid_tool_calls=[{"type": "invalid_tool_call", "name": None, "args": "[", "id": None,
                                                 "error": "the tool-call JSON is incomplete"}],
                       response_metadata={"finish_reason": "stop"})
    for parser in (_PydanticToolsParser(tools=[Joke], first_tool_only=True),
                   _JsonOutputKeyToolsParser(key_name="Joke", first_tool_only=True)):
        with pytest.raises(OutputParserException, match="no valid call.*'stop'.*incomplete"):
            parser.parse_result([ChatGeneration(message=broken)])


def test_a_stop_given_as_one_string_is_one_stop_string():
    llm = ChatJamba(model=HUB_ID)
    assert llm._request([HumanMessage("hi")], "fox", {}).params["stop"] == ["fox"]
    assert ChatJamba(model=HUB_ID, stop=["fox", "dog"])._request([HumanMessage("hi")], None, {}).params["stop"] == ["fox", "dog"]


def test_a_loaded_model_pickles_and_deep_copies(tiny_checkpoint):
    import copy
    import pickle

    llm = ChatJamba(model=str(tiny_checkpoint), max_tokens=3)
    first = llm.invoke("hi").content
    assert copy.deepcopy(llm).engine is llm.engine  # shared, not copied
    again = pickle.loads(pickle.dumps(llm))
    assert again.model == llm.model and again.invoke("hi").content == first


def test_no_room_for_an_answer_says_so_when_max_tokens_is_none(tiny_checkpoint):
    llm = ChatJamba(model=str(tiny_checkpoint), max_tokens=None)
    window = llm.engine.context_window
    with pytest.raises(ValueError, match=rf"the prompt takes \d+ tokens, and the model's context window is {window}: no room"):
        llm.invoke("word " * (window + 10))


def test_a_call_cut_in_its_arguments_goes_back_into_the_history_as_written(tiny_checkpoint):
    """invoke's invalid call held the whole call object as its args, and the stream's a bracket added to
    keep LangChain from repairing it: sent back in the history (an agent keeps the message), the prompt
    showed the call's envelope twice, or the bracket. Both now render what the model wrote."""
    from langchain_jamba.chat_models import _convert_messages

    tools = [{"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}, "required": ["a", "b"]}}}]
    found = 0
    for budget in range(14, 40, 2):
        bound = ChatJamba(model=str(tiny_checkpoint), max_tokens=budget).bind_tools(tools, tool_choice="add")
        invoked = bound.invoke("add 2 and 5")
        if (not invoked.invalid_tool_calls or "incomplete" not in (invoked.invalid_tool_calls[0]["error"] or "")
                or invoked.invalid_tool_calls[0]["args"].startswith('{"name"')):  # cut before its arguments
            continue
        streamed = None
        for chunk in bound.stream("add 2 and 5"):
            streamed = chunk if streamed is None else streamed + chunk
        assert not streamed.tool_calls and streamed.invalid_tool_calls
        args = invoked.invalid_tool_calls[0]["args"]
        assert args.startswith("{")
        histories = [_convert_messages([HumanMessage("add"), m])[-1]["tool_calls"] for m in (invoked, streamed)]
        assert histories[0] == [{**histories[1][0], "id": histories[0][0]["id"]}]
        assert histories[0][0]["function"]["arguments"] == args
        # a stream's merged invalid call has no error (LangChain rebuilds it from the chunks): the metadata has it
        assert "incomplete" in streamed.response_metadata["invalid_tool_calls"][0]["error"]
        found += 1
    assert found


async def _collect(stream) -> list:
    return [item async for item in stream]


def test_sampling_settings_are_checked_when_the_model_is_built():
    for kwargs in (dict(top_k=-1), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.01)):
        with pytest.raises(ValueError, match="top_k|temperature|top_p"):
            ChatJamba(model=HUB_ID, **kwargs)


def test_an_answer_complete_on_the_last_token_parses_though_its_finish_reason_is_length():
    """The grammar can close the JSON on the budget's last token: finish_reason is then "length", but the
    answer is whole and is returned (a random-weight model's JSON evaluation raised on exactly this)."""
    from langchain_core.outputs import ChatGeneration

    from langchain_jamba.chat_models import _JsonOutputParser

    done = AIMessage('{"a": 1}', response_metadata={"finish_reason": "length"})
    assert _JsonOutputParser().parse_result([ChatGeneration(message=done)]) == {"a": 1}


def test_logprobs_follow_chatopenai_settings_and_layout(tiny_checkpoint):
    """`logprobs=True` / `top_logprobs` (fields or call arguments) put OpenAI's layout in response_metadata,
    one entry per generated token, whose bytes join to the raw output; a stream's merged message holds the
    same; without logprobs there is no key."""
    llm = ChatJamba(model=str(tiny_checkpoint), max_tokens=6, logprobs=True, top_logprobs=2)
    message = llm.invoke("Call me Ishmael.")
    content = message.response_metadata["logprobs"]["content"]
    assert len(content) == message.usage_metadata["output_tokens"]
    for entry in content:
        assert set(entry) == {"token", "bytes", "logprob", "top_logprobs"} and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 2 and set(entry["top_logprobs"][0]) == {"token", "bytes", "logprob"}
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    text = bytes(b for e in content for b in e["bytes"]).decode()
    assert re.sub(r"<\|\w+\|>", "", text).strip() == message.content.strip()  # content drops control tokens (<|user|>)
    merged = None
    for chunk in llm.stream("Call me Ishmael."):
        merged = chunk if merged is None else merged + chunk
    assert merged.response_metadata["logprobs"] == message.response_metadata["logprobs"]
    plain = ChatJamba(model=str(tiny_checkpoint), max_tokens=3)
    assert "logprobs" not in plain.invoke("Call me Ishmael.").response_metadata
    per_call = plain.invoke("Call me Ishmael.", logprobs=True)
    assert [e["top_logprobs"] for e in per_call.response_metadata["logprobs"]["content"]] == [[]] * len(
        per_call.response_metadata["logprobs"]["content"])


def test_top_logprobs_are_checked_when_the_model_is_built_and_per_call():
    for kwargs, message in ((dict(logprobs=True, top_logprobs=21), "top_logprobs must be None or an integer in 0..20, got 21"),
                            (dict(top_logprobs=3), "top_logprobs needs logprobs=True")):
        with pytest.raises(ValueError, match=message):
            ChatJamba(model=HUB_ID, **kwargs)
    with pytest.raises(ValueError, match="top_logprobs needs logprobs=True"):
        ChatJamba(model=HUB_ID)._request([HumanMessage("hi")], None, {"top_logprobs": 2})
    assert ChatJamba(model=HUB_ID)._request([HumanMessage("hi")], None, {"logprobs": True, "top_logprobs": 2}).params["logprobs"] == 2


THOUGHT = ('<think>\nThe user asks about Paris. I could write <tool_calls>[{"name": "get_weather", "arguments": '
           '{"city": "Rome"}}]</tool_calls> but that was only a thought.\n</think>\n\n')


def test_a_reasoning_models_thinking_goes_to_reasoning_content_and_is_never_a_call(scripted_engine):
    """Jamba Reasoning 3B thinks in <think> ... </think> before it answers: the thinking was the content's start,
    and a call marker written while thinking became a tool call."""
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return "sunny"

    reasoning = THOUGHT.strip()[len("<think>"):-len("</think>")].strip()
    llm = ChatJamba(model=scripted_engine(THOUGHT + "It is sunny in Paris.")).bind_tools([get_weather])
    message = llm.invoke("Weather in Paris?")
    assert message.content == "It is sunny in Paris." and message.tool_calls == [] and message.invalid_tool_calls == []
    assert message.additional_kwargs["reasoning_content"] == reasoning
    merged = None
    for chunk in llm.stream("Weather in Paris?"):
        merged = chunk if merged is None else merged + chunk
    assert (merged.content, merged.additional_kwargs["reasoning_content"], merged.tool_calls) == (message.content, reasoning, [])
    call = '<tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_calls>'
    message = ChatJamba(model=scripted_engine(THOUGHT + call)).bind_tools([get_weather]).invoke("Weather in Paris?")
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Paris"})]
    none = ChatJamba(model=scripted_engine(THOUGHT + "Sunny.")).bind_tools([get_weather], tool_choice="none").invoke("Hi")
    assert (none.content, none.additional_kwargs["reasoning_content"]) == ("Sunny.", reasoning)  # the ban leaves text free
    opened = ChatJamba(model=scripted_engine("Thinking already.</think>Answer.", opened=True)).invoke("Hi")
    assert (opened.content, opened.additional_kwargs["reasoning_content"]) == ("Answer.", "Thinking already.")
    plain = ChatJamba(model=scripted_engine("<think>x</think>Answer.", thinks=False)).invoke("Hi")  # not a reasoning model
    assert plain.content == "<think>x</think>Answer." and "reasoning_content" not in plain.additional_kwargs


def test_settings_that_change_the_answer_are_part_of_the_cache_key_and_a_call_can_turn_logprobs_off():
    """With a LangChain cache, a logprobs=True model got a plain model's cached answer (no logprobs), as
    top_logprobs, citations, parallel_tool_calls and stop were not in the identifying params; a call's
    logprobs=False on a model with top_logprobs raised instead of answering without them."""
    base = ChatJamba(model=HUB_ID)
    keys = {base._get_llm_string()}
    for kwargs in (dict(logprobs=True), dict(logprobs=True, top_logprobs=2), dict(logprobs=True, top_logprobs=5),
                   dict(citations=True), dict(parallel_tool_calls=False), dict(stop=["\n"])):
        keys.add(ChatJamba(model=HUB_ID, **kwargs)._get_llm_string())
    assert len(keys) == 7
    llm = ChatJamba(model=HUB_ID, logprobs=True, top_logprobs=3)
    assert llm._request([HumanMessage("hi")], None, {"logprobs": False}).params["logprobs"] is None
    assert llm._request([HumanMessage("hi")], None, {}).params["logprobs"] == 3


class _Node(BaseModel):
    """A tree node."""

    value: int
    children: list["_Node"] = []


def test_a_recursive_pydantic_schema_keeps_its_nodes_constrained(tiny_checkpoint):
    """LangChain's converters inline every `$ref` and leave a recursive one as ``{}`` (any value): the
    grammar then let ``children`` hold strings ("children.0 Input should be a valid dictionary"). The
    recursive model keeps its `$defs` in every path (tool, json_schema, a response_format class), and
    random weights constrained by it write only nodes."""
    from langchain_jamba.chat_models import _json_schema, _normalize_response_format, _openai_tool

    params = _openai_tool(_Node)["function"]["parameters"]
    assert params["properties"]["children"]["items"] == {"$ref": "#/$defs/_Node"} and "_Node" in params["$defs"]
    assert _json_schema(_Node)["properties"]["children"]["items"] == {"$ref": "#/$defs/_Node"}
    assert _normalize_response_format(_Node)["json_schema"]["schema"]["$defs"]
    strict = _openai_tool(_Node, strict=True)["function"]["parameters"]
    assert strict["additionalProperties"] is False and strict["$defs"]["_Node"]["additionalProperties"] is False
    class Holder(BaseModel):
        tree: _Node  # not recursive itself, but holds a recursive model: that one keeps its $defs

    class Point(BaseModel):
        x: int

    class Line(BaseModel):
        start: Point
        end: Point

    assert "_Node" in _openai_tool(Holder)["function"]["parameters"]["$defs"]
    assert "$defs" not in _openai_tool(Line)["function"]["parameters"]  # no recursion: LangChain's own form
    seen = 0
    for seed in range(6):
        for method in ("json_schema", "function_calling"):
            llm = ChatJamba(model=str(tiny_checkpoint), max_tokens=200, temperature=1.0, seed=seed)
            out = llm.with_structured_output(_Node, method=method, include_raw=True).invoke("A tree, please.")
            if out["parsing_error"] is None:
                seen += 1
                assert isinstance(out["parsed"], _Node)
            else:  # cut off by max_tokens, never a wrong-shaped node
                assert "children" not in str(out["parsing_error"]) or "dictionary" not in str(out["parsing_error"])
    assert seen >= 3
