"""JambaLLM conformance: every LlamaIndex LLM entry point, sync and async, streaming and not, with and
without tools, on the tiny random-weight checkpoint (its text is noise; the shapes, the agreement
between forms, the tool and JSON constraints and the usage are what is tested)."""

import asyncio
import contextlib
import json
import os
import time
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CitableBlock,
    ImageBlock,
    TextBlock,
    ToolCallBlock,
)
from llama_index.core.callbacks.token_counting import get_tokens_from_response
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatStartEvent, LLMCompletionStartEvent
from llama_index.core.prompts import PromptTemplate
from llama_index.core.tools import FunctionTool

from jamba_core.engine import Engine, StreamChunk, Timings, Usage
from jamba_core.testing import trained_checkpoint
from llama_index_jamba import JambaLLM
from llama_index_jamba.base import to_jamba_message

QUESTION = [ChatMessage(role="user", content="Who hunts the white whale?")]


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


TOOLS = [FunctionTool.from_defaults(multiply), FunctionTool.from_defaults(add)]


class Whale(BaseModel):
    """A whale, as the structured-output tests ask for it."""

    species: Literal["sperm", "right", "humpback"]
    length_m: int
    white: bool
    name: str = Field(max_length=12)


class LLMCalls(BaseEventHandler):
    """Counts LLM calls (chat and completion starts) and keeps the messages of each chat call."""

    calls: int = 0
    chat_messages: list = []

    @classmethod
    def class_name(cls) -> str:
        return "LLMCalls"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LLMChatStartEvent):
            self.calls += 1
            self.chat_messages.append(list(event.messages))
        elif isinstance(event, LLMCompletionStartEvent):
            self.calls += 1


@contextlib.contextmanager
def count_llm_calls():
    root = get_dispatcher()
    handler = LLMCalls(chat_messages=[])
    root.add_event_handler(handler)
    try:
        yield handler
    finally:
        root.event_handlers.remove(handler)


class ScriptedEngine(Engine):
    """The tiny checkpoint's tokenizer and template with a scripted answer instead of the model, for
    behaviour a random-weight model never shows (text followed by a tool call, citations). The prompt
    is still rendered and counted as usual."""

    def __init__(self, real: Engine, script: str):
        super().__init__(real.model, real.config, real.tokenizer, real.path)
        self.script = script

    def stream(self, prompt, *, max_new_tokens=256, tools=None, documents=None, response_format=None,
               citations=False, **kwargs):
        ids = self.encode(prompt, tools, documents, response_format, citations)
        self.check_fits(len(ids), max_new_tokens)
        pieces = [self.tokenizer.decode([t]) for t in self.tokenizer.encode(self.script, add_special_tokens=False)]
        for piece in pieces:
            yield StreamChunk(piece, [0])
        yield StreamChunk("", [], "stop", Usage(len(ids), len(pieces)), Timings())


def _counts(response) -> tuple:
    """(prompt, completion) tokens: what must agree between forms (cached_tokens depends on what the
    engine's prefix cache holds by then)."""
    usage = response.raw["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


@pytest.fixture(scope="module")
def llm(tiny_engine):
    return JambaLLM(tiny_engine, max_new_tokens=16)


# -- metadata and the engine ------------------------------------------------------------------------
def test_a_missing_folder_reads_as_the_engine_says_it(tmp_path):
    """JambaLLM's metadata (config.json only) said "HFValidationError: Repo id must be in the form..." for a
    missing folder, where the engine, ChatJamba and the CLI say the folder does not exist."""
    with pytest.raises(FileNotFoundError, match=r"checkpoint folder .*nope does not exist"):
        JambaLLM(tmp_path / "nope").metadata


def test_a_misspelt_option_warns_and_max_tokens_is_max_new_tokens(tiny_engine):
    """pydantic drops unknown options without a word: JambaLLM(max_tokens=3) kept 256 tokens."""
    assert JambaLLM(tiny_engine, max_tokens=3).max_new_tokens == 3  # ChatJamba's (and OpenAI's) name
    llm = JambaLLM(tiny_engine, max_new_tokens=5)
    assert type(llm).from_dict(llm.to_dict()).max_new_tokens == 5
    with pytest.warns(UserWarning, match=r"JambaLLM has no option 'temprature'.*did you mean 'temperature'") as caught:
        JambaLLM(tiny_engine, temprature=0.5)
    assert caught[0].filename == __file__




def test_metadata_comes_from_config_without_loading_weights(tiny_checkpoint):
    llm = JambaLLM(model=str(tiny_checkpoint), max_new_tokens=64)
    meta = llm.metadata
    assert llm._engine is None  # config.json only
    assert meta.context_window == 262144
    assert meta.num_output == 64
    assert meta.is_chat_model and meta.is_function_calling_model
    assert meta.model_name == tiny_checkpoint.name


def test_context_window_can_be_narrowed_for_budgeting(tiny_checkpoint):
    assert JambaLLM(model=str(tiny_checkpoint), context_window=3900).metadata.context_window == 3900


def test_instances_with_same_checkpoint_share_one_engine(tiny_checkpoint):
    a, b = JambaLLM(model=str(tiny_checkpoint)), JambaLLM(model=str(tiny_checkpoint), temperature=0.5)
    assert a.engine is b.engine
    assert a.metadata.context_window == a.engine.context_window


def test_model_defaults_to_the_environment(monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("JAMBA_LOCAL_MODEL", str(tiny_checkpoint))
    assert JambaLLM().model == str(tiny_checkpoint)
    monkeypatch.delenv("JAMBA_LOCAL_MODEL")
    with pytest.raises(ValueError, match="JAMBA_LOCAL_MODEL"):
        JambaLLM()


def test_an_engine_can_be_passed_as_model(tiny_engine, llm):
    assert llm.engine is tiny_engine
    assert llm.model == str(tiny_engine.path)


# -- chat and complete: four forms each, one answer -------------------------------------------------


@pytest.mark.asyncio
async def test_chat_forms_agree_and_report_usage(llm, tiny_engine):
    whole = llm.chat(QUESTION)
    streamed = list(llm.stream_chat(QUESTION))
    awhole = await llm.achat(QUESTION)
    astreamed = [r async for r in await llm.astream_chat(QUESTION)]

    text = whole.message.content
    assert text and whole.message.role == "assistant"
    assert "".join(r.delta for r in streamed) == text == streamed[-1].message.content
    assert awhole.message.content == text
    assert "".join(r.delta for r in astreamed) == text == astreamed[-1].message.content

    usage = whole.raw["usage"]
    assert usage["prompt_tokens"] == tiny_engine.count_tokens([{"role": "user", "content": QUESTION[0].content}])
    assert 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert _counts(streamed[-1]) == _counts(whole) == _counts(astreamed[-1])
    assert usage["cached_tokens"] >= 0  # prompt tokens resumed from the engine's prefix cache
    assert set(whole.raw["timings"]) >= {"time_to_first_token_s", "prefill_s", "decode_s", "prefill_tokens_per_s",
                                         "decode_tokens_per_s"}
    assert whole.raw["finish_reason"] in ("stop", "length")
    assert get_tokens_from_response(whole) == (usage["prompt_tokens"], usage["completion_tokens"])


@pytest.mark.asyncio
async def test_complete_forms_agree_and_send_the_prompt_as_a_user_turn(llm):
    prompt = QUESTION[0].content
    whole = llm.complete(prompt)
    streamed = list(llm.stream_complete(prompt))
    awhole = await llm.acomplete(prompt)
    astreamed = [r async for r in await llm.astream_complete(prompt)]
    assert whole.text == llm.chat(QUESTION).message.content
    assert "".join(r.delta for r in streamed) == whole.text == streamed[-1].text
    assert awhole.text == whole.text
    assert "".join(r.delta for r in astreamed) == whole.text
    assert whole.raw["usage"]["prompt_tokens"] == llm.chat(QUESTION).raw["usage"]["prompt_tokens"]


def test_formatted_complete_sends_raw_text_without_template(llm, tiny_engine):
    prompt = "Call me Ishmael. Some years ago"
    whole = llm.complete(prompt, formatted=True)
    assert whole.raw["usage"]["prompt_tokens"] == len(tiny_engine.encode(prompt))
    assert "".join(r.delta for r in llm.stream_complete(prompt, formatted=True)) == whole.text


def test_per_call_settings_override_fields(llm):
    short = llm.chat(QUESTION, max_new_tokens=3)
    assert short.raw["usage"]["completion_tokens"] == 3 and short.raw["finish_reason"] == "length"
    full = llm.chat(QUESTION).message.content
    stop = full.strip().split()[1]
    cut = llm.chat(QUESTION, stop=[stop]).message.content
    assert stop not in cut and full.startswith(cut) and len(cut) < len(full)
    sampled = [llm.chat(QUESTION, temperature=1.0, seed=7).message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_formatted_complete_refuses_what_needs_the_chat_template(llm):
    """Documents, citations, tools and a response format go through the chat template, which formatted
    text bypasses: they were accepted and dropped."""
    for kwargs in (dict(documents=["The Pequod sails."]), dict(citations=True), dict(response_format={"type": "json_object"})):
        with pytest.raises(TypeError, match=r"formatted=True.*\['(documents|citations|response_format)'\]"):
            llm.complete("Hi", formatted=True, **kwargs)
    assert llm.complete("Hi", formatted=True, max_new_tokens=2).raw["usage"]["completion_tokens"] == 2


def test_an_unknown_per_call_keyword_is_refused(llm):
    """A misspelt setting used to be ignored (the call ran with the field's value)."""
    for call in (lambda: llm.chat(QUESTION, max_token=3), lambda: llm.complete("Hi", temprature=0.5),
                 lambda: list(llm.stream_chat(QUESTION, max_new_token=3)), lambda: llm.count_tokens(QUESTION, stops=["x"])):
        with pytest.raises(TypeError, match=r"unexpected keyword arguments \['(max_token|temprature|max_new_token|stops)'\]"):
            call()
    assert llm.chat(QUESTION, max_tokens=2).raw["usage"]["completion_tokens"] == 2  # the OpenAI name is known


def test_logprobs_per_token_with_the_chosen_token_first(llm, tiny_engine):
    """logprobs=True / top_logprobs (fields or per call): one list per generated token, the generated token
    first (as the engine reports it), then the alternatives without it; streams end with the same."""
    response = llm.chat(QUESTION, logprobs=True, top_logprobs=3)
    assert len(response.logprobs) == response.raw["usage"]["completion_tokens"]
    from jamba_core.chat.api import chat

    want = chat(tiny_engine, [{"role": "user", "content": QUESTION[0].content}], max_new_tokens=16, logprobs=3).logprobs
    assert [[p.token for p in position][:1] for position in response.logprobs] == [[e.token] for e in want]
    for position, entry in zip(response.logprobs, want):
        assert position[0].logprob == pytest.approx(entry.logprob, abs=1e-5) and position[0].bytes == entry.bytes
        others = [t for t in entry.top_logprobs if t.token_id != entry.token_id]
        assert [p.token for p in position[1:]] == [t.token for t in others] and len(position) in (3, 4)
    streamed = list(llm.stream_chat(QUESTION, logprobs=True, top_logprobs=3))
    assert streamed[-1].logprobs == response.logprobs and all(r.logprobs is None for r in streamed[:-1])
    assert llm.complete("Hi", logprobs=True).logprobs is not None and llm.complete("Hi").logprobs is None
    raw = llm.complete("Call me Ishmael.", formatted=True, logprobs=True)
    assert len(raw.logprobs) == raw.raw["usage"]["completion_tokens"] and all(len(p) == 1 for p in raw.logprobs)
    with pytest.raises(ValueError, match="logprobs must be None or an integer in 0..20"):
        llm.chat(QUESTION, logprobs=True, top_logprobs=21)
    alone = llm.chat(QUESTION, logprobs=True, top_logprobs=None)  # (returned none: None reached the engine as "off")
    assert alone.logprobs and all(len(p) == 1 for p in alone.logprobs)
    built = JambaLLM(llm.engine, max_new_tokens=4, logprobs=True, top_logprobs=None)  # (refused by the field's type)
    assert all(len(p) == 1 for p in built.chat(QUESTION).logprobs)


@pytest.mark.asyncio
async def test_async_calls_leave_the_event_loop_free(llm):
    ticks = 0
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    started = time.perf_counter()
    await llm.achat(QUESTION, max_new_tokens=48)
    async for _ in await llm.astream_chat(QUESTION, max_new_tokens=48):
        pass
    elapsed = time.perf_counter() - started
    done.set()
    await task
    # a blocked loop ticks about twice in all; a free one at least every 50 ms (GIL switches included)
    assert ticks >= max(10, int(elapsed / 0.05))


@pytest.mark.asyncio
async def test_async_stream_stopped_early_releases_the_engine(llm):
    stream = await llm.astream_chat(QUESTION, max_new_tokens=200)
    async for _ in stream:
        break
    await stream.aclose()
    response = await asyncio.wait_for(llm.achat(QUESTION, max_new_tokens=2), timeout=60)
    assert response.raw["usage"]["completion_tokens"] == 2


# -- messages in -------------------------------------------------------------------------------------


def test_documents_go_in_the_documents_channel(llm, tiny_engine):
    docs = [{"title": "Loomings", "text": "Call me Ishmael."}, "The Spouter-Inn."]
    with_docs = llm.chat(QUESTION, documents=docs, max_new_tokens=2)
    expected = tiny_engine.count_tokens([{"role": "user", "content": QUESTION[0].content}],
                                        documents=[docs[0], {"text": docs[1]}])
    assert with_docs.raw["usage"]["prompt_tokens"] == expected
    as_blocks = ChatMessage(role="user", blocks=[
        CitableBlock(title="Loomings", source="ch1", content=[TextBlock(text="Call me Ishmael.")]),
        TextBlock(text=QUESTION[0].content)])
    documents = []
    assert to_jamba_message(as_blocks, documents) == {"role": "user", "content": QUESTION[0].content}
    assert documents == [{"title": "Loomings", "source": "ch1", "text": "Call me Ishmael."}]
    prompt = tiny_engine.render([{"role": "user", "content": "q"}], documents=documents)
    assert "<documents>" in prompt and "Call me Ishmael." in prompt


def test_tool_calls_and_results_in_history_are_rendered(tiny_engine):
    call = ToolCallBlock(tool_call_id="call_1", tool_name="multiply", tool_kwargs={"a": 3, "b": 4})
    as_block = ChatMessage(role="assistant", blocks=[TextBlock(text="Let me compute."), call])
    as_kwargs = ChatMessage(role="assistant", content="Let me compute.", additional_kwargs={"tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "multiply", "arguments": '{"a": 3, "b": 4}'}}]})
    result = ChatMessage(role="tool", content="12", additional_kwargs={"tool_call_id": "call_1", "name": "multiply"})
    rendered = []
    for assistant in (as_block, as_kwargs):
        msgs = [to_jamba_message(m, []) for m in (QUESTION[0], assistant, result)]
        assert msgs[2] == {"role": "tool", "content": "12", "tool_call_id": "call_1", "name": "multiply"}
        rendered.append(tiny_engine.render(msgs))
    assert rendered[0] == rendered[1]
    assert '<tool_calls>[\n    {"name": "multiply", "arguments": {"a": 3, "b": 4}}\n]</tool_calls>' in rendered[0]
    assert "<|tool|> (multiply)12" in rendered[0]


def test_non_text_content_is_refused_clearly(llm):
    image = ChatMessage(role="user", blocks=[ImageBlock(url="https://example.com/whale.png")])
    with pytest.raises(ValueError, match="reads text only"):
        llm.chat([image])


# -- tools -------------------------------------------------------------------------------------------


def _assert_valid_call(selection, names=("multiply", "add")):
    assert selection.tool_name in names and selection.tool_id.startswith("call_")
    assert set(selection.tool_kwargs) == {"a", "b"}
    assert all(isinstance(v, int) for v in selection.tool_kwargs.values())


def test_tool_required_forces_one_call_in_blocks_and_additional_kwargs(llm):
    response = llm.chat_with_tools(TOOLS[:1], user_msg="What is 3 times 4?", tool_required=True, max_new_tokens=64)
    blocks = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
    assert len(blocks) == 1 and blocks[0].tool_name == "multiply"
    (openai_call,) = response.message.additional_kwargs["tool_calls"]
    assert openai_call["id"] == blocks[0].tool_call_id and openai_call["type"] == "function"
    assert json.loads(openai_call["function"]["arguments"]) == blocks[0].tool_kwargs
    assert response.raw["finish_reason"] == "tool_calls"
    (selection,) = llm.get_tool_calls_from_response(response)
    _assert_valid_call(selection, ("multiply",))


def test_tool_choice_names_a_tool_or_turns_tools_off(llm):
    named = llm.chat_with_tools(TOOLS, user_msg="2 plus 2?", tool_choice="add", max_new_tokens=64)
    assert [s.tool_name for s in llm.get_tool_calls_from_response(named)] == ["add"]
    as_dict = llm.chat_with_tools(TOOLS, user_msg="2 plus 2?", max_new_tokens=64,
                                  tool_choice={"type": "function", "function": {"name": "multiply"}})
    assert [s.tool_name for s in llm.get_tool_calls_from_response(as_dict)] == ["multiply"]
    off = llm.chat_with_tools(TOOLS, user_msg="2 plus 2?", tool_choice="none", max_new_tokens=16)
    assert llm.get_tool_calls_from_response(off, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="names no"):
        llm.chat_with_tools(TOOLS, user_msg="2 plus 2?", tool_choice="divide")


def test_parallel_calls_are_cut_to_one_unless_allowed(llm):
    kwargs = dict(user_msg="3 times 4, and 2 plus 2?", tool_required=True, max_new_tokens=60)
    single = llm.chat_with_tools(TOOLS, allow_parallel_tool_calls=False, **kwargs)
    assert len(llm.get_tool_calls_from_response(single)) == 1
    assert len(single.message.additional_kwargs["tool_calls"]) == 1
    several = llm.chat_with_tools(TOOLS, allow_parallel_tool_calls=True, **kwargs)
    for selection in llm.get_tool_calls_from_response(several):
        _assert_valid_call(selection)


@pytest.mark.asyncio
async def test_tool_calls_stream_as_partial_calls_sync_and_async(llm):
    kwargs = dict(user_msg="What is 3 times 4?", tool_required=True, max_new_tokens=64)
    whole = llm.chat_with_tools(TOOLS[:1], **kwargs)
    streamed = list(llm.stream_chat_with_tools(TOOLS[:1], **kwargs))
    astreamed = [r async for r in await llm.astream_chat_with_tools(TOOLS[:1], **kwargs)]
    awhole = await llm.achat_with_tools(TOOLS[:1], **kwargs)
    final = whole.message.additional_kwargs["tool_calls"][0]["function"]["arguments"]
    for stream in (streamed, astreamed):
        partial_args = [r.message.additional_kwargs["tool_calls"][0]["function"]["arguments"]
                        for r in stream[:-1] if r.message.additional_kwargs.get("tool_calls")]
        assert len(partial_args) > 3  # the arguments arrive piece by piece
        assert all(b.startswith(a) for a, b in zip(partial_args, partial_args[1:]))
        assert json.loads(partial_args[-1]) == json.loads(final)
        mid = llm.get_tool_calls_from_response(stream[len(stream) // 2], error_on_no_tool_call=False)
        assert [s.tool_name for s in mid] == ["multiply"]
        assert [s.tool_kwargs for s in llm.get_tool_calls_from_response(stream[-1])] == \
            [s.tool_kwargs for s in llm.get_tool_calls_from_response(whole)]
        assert _counts(stream[-1]) == _counts(whole)
    assert llm.get_tool_calls_from_response(awhole)[0].tool_kwargs == llm.get_tool_calls_from_response(whole)[0].tool_kwargs


def test_text_and_tool_call_both_stream(tiny_engine):
    script = 'Let me multiply those.<tool_calls>[\n    {"name": "multiply", "arguments": {"a": 3, "b": 4}}\n]</tool_calls>'
    llm = JambaLLM(ScriptedEngine(tiny_engine, script))
    stream = list(llm.stream_chat_with_tools(TOOLS, user_msg="What is 3 times 4?"))
    assert "".join(r.delta for r in stream) == "Let me multiply those."
    first_call = next(i for i, r in enumerate(stream) if r.message.additional_kwargs.get("tool_calls"))
    last_text = max(i for i, r in enumerate(stream) if r.delta)
    assert last_text < first_call < len(stream) - 1  # text first, then the call arrives in pieces
    final = stream[-1]
    assert final.message.content == "Let me multiply those."
    (selection,) = llm.get_tool_calls_from_response(final)
    assert (selection.tool_name, selection.tool_kwargs) == ("multiply", {"a": 3, "b": 4})
    assert final.raw["finish_reason"] == "tool_calls"


# JAMBA_LOCAL_TEST_MODEL, else the small checkpoint this project trained (checkpoints/jamba-tiny-chat)
CAPABLE_MODEL = os.environ.get("JAMBA_LOCAL_TEST_MODEL") or (
    str(trained) if (trained := trained_checkpoint(missing_ok=True)) else None)


@pytest.mark.xfail(CAPABLE_MODEL is None, run=False,
                   reason="needs a capable checkpoint: JAMBA_LOCAL_TEST_MODEL or the trained checkpoints/jamba-tiny-chat")
def test_capable_model_streams_its_tool_call():
    llm = JambaLLM(model=CAPABLE_MODEL, max_new_tokens=128)
    stream = list(llm.stream_chat_with_tools(TOOLS, user_msg="Use a tool: what is 37 times 91?"))
    calls = llm.get_tool_calls_from_response(stream[-1], error_on_no_tool_call=False)
    assert [c.tool_name for c in calls] == ["multiply"] and calls[0].tool_kwargs == {"a": 37, "b": 91}
    assert "".join(r.delta for r in stream) == stream[-1].message.content


def test_predict_and_call_runs_the_forced_tool(llm):
    result = llm.predict_and_call(TOOLS[:1], user_msg="What is 3 times 4?", tool_required=True, max_new_tokens=64)
    (output,) = result.sources
    assert output.tool_name == "multiply" and not output.is_error
    assert result.response == str(multiply(**output.raw_input["kwargs"]))


def test_predict_and_call_with_a_text_answer_says_so(llm):
    with pytest.raises(ValueError, match="answered in text instead of calling a tool.*tool_required=True"):
        llm.predict_and_call(TOOLS, user_msg="Tell me about whales.")
    text = llm.predict_and_call(TOOLS, user_msg="Tell me about whales.", error_on_no_tool_call=False)
    assert text.sources == [] and text.response == llm.chat(
        [ChatMessage(role="user", content="Tell me about whales.")], tools=TOOLS
    ).message.content


def test_unusable_tool_call_is_reported_with_its_error(llm):
    message = ChatMessage(role="assistant", content="", additional_kwargs={"invalid_tool_calls": [
        {"id": "call_x", "name": "multiply", "args": '{"a": 3,', "error": "tool-call JSON is incomplete"}]})
    with pytest.raises(ValueError, match="tool-call JSON is incomplete"):
        llm.get_tool_calls_from_response(ChatResponse(message=message))


@pytest.mark.asyncio
async def test_function_agent_runs_a_full_loop_with_a_forced_first_call(llm):
    from llama_index.core.agent.workflow import AgentStream, FunctionAgent, ToolCallResult

    llm = JambaLLM(llm.engine, max_new_tokens=64)
    agent = FunctionAgent(tools=TOOLS, llm=llm, initial_tool_choice="multiply", timeout=300)
    with count_llm_calls() as calls:
        handler = agent.run("What is 3 times 4?")
        results, streamed_calls = [], []
        async for event in handler.stream_events():
            if isinstance(event, ToolCallResult):
                results.append(event)
            elif isinstance(event, AgentStream) and event.tool_calls:
                streamed_calls.append(event.tool_calls)
        answer = await handler
    (result,) = results
    assert result.tool_name == "multiply" and result.tool_output.content == str(multiply(**result.tool_kwargs))
    assert streamed_calls and streamed_calls[-1][0].tool_kwargs == result.tool_kwargs
    assert calls.calls == 2  # the forced call, then the answer
    second = calls.chat_messages[1]
    tool_messages = [m for m in second if m.role == "tool"]
    assert [m.content for m in tool_messages] == [result.tool_output.content]
    assert result.tool_output.content in llm.engine.render([to_jamba_message(m, []) for m in second])
    assert answer.response.content  # the text answer that ended the loop


# -- structured output ---------------------------------------------------------------------------------

WHALE_PROMPT = PromptTemplate("Describe the whale in {book}.")


@pytest.mark.asyncio
async def test_structured_predict_forms_decode_the_schema(llm):
    kwargs = dict(llm_kwargs={"max_new_tokens": 80}, book="Moby-Dick")
    whale = llm.structured_predict(Whale, WHALE_PROMPT, **kwargs)
    assert isinstance(whale, Whale)
    assert await llm.astructured_predict(Whale, WHALE_PROMPT, **kwargs) == whale
    parts = list(llm.stream_structured_predict(Whale, WHALE_PROMPT, **kwargs))
    assert len(parts) > 3 and parts[-1] == whale
    filled = [sum(v is not None for v in p.model_dump().values()) for p in parts]
    assert filled == sorted(filled)  # fields fill in as their JSON arrives
    aparts = [p async for p in await llm.astream_structured_predict(Whale, WHALE_PROMPT, **kwargs)]
    assert aparts[-1] == whale


@pytest.mark.asyncio
async def test_as_structured_llm_returns_schema_json(llm):
    sllm = JambaLLM(llm.engine, max_new_tokens=80).as_structured_llm(Whale)
    response = sllm.chat([ChatMessage(role="user", content="Describe Moby Dick.")])
    whale = Whale.model_validate_json(response.message.content)
    assert response.raw == whale
    assert (await sllm.achat([ChatMessage(role="user", content="Describe Moby Dick.")])).raw == whale
    last = list(sllm.stream_chat([ChatMessage(role="user", content="Describe Moby Dick.")]))[-1]
    assert Whale.model_validate_json(last.message.content) == whale
    assert Whale.model_validate_json(sllm.complete("Describe Moby Dick.").text) == whale


def test_structured_output_cut_off_says_to_raise_max_new_tokens(llm):
    with pytest.raises(ValueError, match="cut off.*raise max_new_tokens"):
        llm.structured_predict(Whale, WHALE_PROMPT, llm_kwargs={"max_new_tokens": 4}, book="Moby-Dick")


def test_a_reasoning_models_thinking_is_a_thinking_block_and_never_a_call(scripted_engine):
    from llama_index.core.base.llms.types import TextBlock, ThinkingBlock

    thought = ('<think>\nI could call <tool_calls>[{"name": "multiply", "arguments": {"a": 1, "b": 2}}]</tool_calls>, '
               'but no.\n</think>\n\n')
    llm = JambaLLM(scripted_engine(thought + "Twelve."))
    response = llm.chat(QUESTION)
    assert [type(b) for b in response.message.blocks] == [ThinkingBlock, TextBlock]
    assert response.message.blocks[0].content.startswith("I could call") and response.message.content == "Twelve."
    assert "tool_calls" not in response.message.additional_kwargs
    streamed = list(llm.stream_chat(QUESTION))
    thinking = "".join(r.additional_kwargs.get("thinking_delta", "") for r in streamed)
    assert thinking == response.message.blocks[0].content and "".join(r.delta for r in streamed) == "Twelve."
    assert streamed[-1].message.blocks[0].content == thinking
