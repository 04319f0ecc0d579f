"""LangChain's standard integration suite for ChatJamba, on a real checkpoint run in this process.

By default the checkpoint is the random-weight `tiny` one from conftest: everything LangChain asks of a
chat model's plumbing (invoke, stream, async, batch, usage, tool-call and structured-output mechanics,
tool-message histories) must pass on it. The standard tests whose assertions need a model that
understands the prompt (exact arguments, choosing a tool unprompted, copying CJK names, keys asked for
in JSON mode) run on the small checkpoint this project trained (`checkpoints/jamba-tiny-chat`), and
those it still fails are marked xfail with what it gets wrong; with ``JAMBA_LOCAL_TEST_MODEL`` (a
checkpoint folder or Hub id) set, every test runs unmodified on that checkpoint. Forced calls and
JSON answers finish within ``max_tokens`` on random weights because the grammar closes the output as
the budget runs out (`jamba_core.chat.grammar.GrammarConstraint.remaining_tokens`).

After the standard suite, ChatJamba's own promises run on the same checkpoint.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Literal

import pytest

pytest.importorskip("langchain_tests")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from langchain_jamba import ChatJamba  # noqa: E402

from jamba_core.testing import trained_checkpoint  # noqa: E402

TEST_MODEL = os.environ.get("JAMBA_LOCAL_TEST_MODEL")
TRAINED = str(trained) if (trained := trained_checkpoint(missing_ok=True)) else None
_CHECKPOINT: dict[str, str | None] = {"model": TEST_MODEL, "override": None}
# what the trained checkpoint (6.1M parameters) still gets wrong, measured: standard test -> reason
# (session 15's checkpoint: the other capable tests pass: exact arguments, the agent loop, runnables as tools;
# the unicode tool call passed on session 14's and failed on session 13's: a coin toss on these prompts)
FAILS_ON_TRAINED: dict[str, str] = {
    "test_json_mode": "in JSON mode without a schema it writes an object, but not with the keys 'setup' and 'punchline' "
                      "that only the request names",
    "test_unicode_tool_call_integration": "its forced call names the customer 'familiarteredakant.' for '你好啊集团 (Hello "
                                          "Group) - a Chinese technology company'; 30 of 32 variants of the prompt (other "
                                          "CJK and kana names, shorter descriptions) keep the name (session 14's: 31)",
}


def _own_copy(test):
    """A wrapper of an inherited standard test, so marks put on it leave the suite's function alone."""
    if inspect.iscoroutinefunction(test):
        @functools.wraps(test)
        async def run(self, *args, **kwargs):
            return await test(self, *args, **kwargs)
    else:
        @functools.wraps(test)
        def run(self, *args, **kwargs):
            return test(self, *args, **kwargs)
    return run


_CAPABLE: set[str] = set()


def _needs_capable_model(test, reason: str):
    """The standard test `test`, whose assertions need a model that follows the prompt: run on the
    trained checkpoint (xfail where `FAILS_ON_TRAINED` says it fails there; everywhere without one, on
    random weights), unmodified on JAMBA_LOCAL_TEST_MODEL when that is set."""
    _CAPABLE.add(test.__name__)
    if TEST_MODEL is None and TRAINED is None:
        return pytest.mark.xfail(reason=f"needs a capable model: {reason}", strict=False)(_own_copy(test))
    if TEST_MODEL is None and test.__name__ in FAILS_ON_TRAINED:
        return pytest.mark.xfail(reason=f"the trained checkpoint fails it: {FAILS_ON_TRAINED[test.__name__]}", strict=False)(_own_copy(test))
    return test  # the suite's own function: LangChain's test_no_overrides refuses an unmarked override


_ARGS_3 = "the exact arguments {'input': 3} must be read from the prompt; random weights fill the schema with noise"
_BASE = ChatModelIntegrationTests


# The suite's async tests are plain coroutines (LangChain's packages run pytest-asyncio in auto mode);
# overriding them to mark them is refused by the suite, so the class carries the mark, and the warning
# it raises for the sync tests is silenced.
@pytest.mark.asyncio
@pytest.mark.filterwarnings("ignore:The test <Function .* is marked with '@pytest.mark.asyncio' but it is not an async function")
class TestChatJambaStandard(ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _checkpoint(self, request, tmp_path_factory):
        if TEST_MODEL is None:
            capable = TRAINED is not None and request.node.originalname in _CAPABLE
            _CHECKPOINT["model"] = TRAINED if capable else str(request.getfixturevalue("tiny_checkpoint"))
        base = TEST_MODEL or str(request.getfixturevalue("tiny_checkpoint"))
        if _CHECKPOINT["override"] is None and Path(base).is_dir():
            # The same checkpoint under a second name: a per-call `model=` override reaches the engine
            # (shared, as both names resolve to one folder) and shows in response_metadata.
            link = tmp_path_factory.mktemp("override") / "jamba-override"
            link.symlink_to(Path(base).resolve(), target_is_directory=True)
            _CHECKPOINT["override"] = str(link)

    @property
    def chat_model_class(self) -> type[ChatJamba]:
        return ChatJamba

    @property
    def chat_model_params(self) -> dict:
        # random weights rarely emit EOS: every call runs to max_tokens, so keep it small (64: enough for the
        # tiny tokenizer to finish a forced call with an integer argument)
        # one call per forced choice on random weights, which never choose to stop calling on their own
        if TEST_MODEL or _CHECKPOINT["model"] == TRAINED:
            return {"model": _CHECKPOINT["model"], "max_tokens": 256}
        return {"model": _CHECKPOINT["model"], "max_tokens": 96, "parallel_tool_calls": False}

    @property
    def model_override_value(self) -> str | None:
        return _CHECKPOINT["override"]

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True  # text blocks with cache_control, tool_use and thinking blocks in history

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False):
        """The same long prompt twice: the second call reads the first one's prompt state (`cache_read`)."""
        llm = ChatJamba(**self.chat_model_params)
        prompt = "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about a little."
        llm.invoke(prompt, max_tokens=1)
        if not stream:
            return llm.invoke(prompt, max_tokens=4)
        full = None
        for chunk in llm.stream(prompt, max_tokens=4):
            full = chunk if full is None else full + chunk
        return full

    test_tool_calling = _needs_capable_model(_BASE.test_tool_calling, _ARGS_3)
    test_tool_calling_async = _needs_capable_model(_BASE.test_tool_calling_async, _ARGS_3)
    test_agent_loop = _needs_capable_model(
        _BASE.test_agent_loop, "with tool_choice left to the model, it must choose to call get_weather unprompted")
    test_unicode_tool_call_integration = _needs_capable_model(
        _BASE.test_unicode_tool_call_integration,
        "the CJK customer name must be copied from the prompt into the arguments")
    test_json_mode = _needs_capable_model(
        _BASE.test_json_mode,
        "JSON mode allows any object; the keys 'setup' and 'punchline' are asked for in the prompt only")
    test_bind_runnables_as_tools = _needs_capable_model(
        _BASE.test_bind_runnables_as_tools,
        "the schema allows an empty 'answer_style'; the test wants a non-empty one, which random weights give only "
        "by chance (they do with the Moby-Dick tokenizer, not with the fallback one)")


# -- ChatJamba's own promises, beyond the standard suite, on the same checkpoint ----------------------------


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> str:
    return TEST_MODEL or str(tiny_checkpoint)


@tool
def magic_function(input: int) -> int:
    """Apply a magic function to an input."""
    return input + 2


class Pick(BaseModel):
    """A colour and how many."""

    color: Literal["red", "green", "blue"]
    count: int = Field(ge=0, le=99)


class Order(BaseModel):
    """An order of picks (enums, integers and booleans only: random weights finish such JSON quickly)."""

    pick: Pick
    rush: bool


def _merge(chunks):
    full = None
    for chunk in chunks:
        assert isinstance(chunk, AIMessageChunk)
        full = chunk if full is None else full + chunk
    return full


MESSAGES = [SystemMessage("You answer briefly."), HumanMessage("Call me Ishmael. Who am I?")]


def test_usage_input_tokens_equal_the_exact_prompt_count(checkpoint):
    llm = ChatJamba(model=checkpoint, max_tokens=8)
    assert llm.invoke(MESSAGES).usage_metadata["input_tokens"] == llm.get_num_tokens_from_messages(MESSAGES)
    with_tools = llm.bind_tools([magic_function, Order])
    assert (with_tools.invoke(MESSAGES).usage_metadata["input_tokens"]
            == llm.get_num_tokens_from_messages(MESSAGES, tools=[magic_function, Order]))
    docs = [Document("The Pequod sails from Nantucket.", metadata={"title": "Ch. 16"}), {"text": "Ahab is the captain."}]
    with_docs = llm.invoke(MESSAGES, documents=docs)
    assert with_docs.usage_metadata["input_tokens"] == llm.get_num_tokens_from_messages(MESSAGES, documents=docs)
    assert with_docs.usage_metadata["input_tokens"] > llm.get_num_tokens_from_messages(MESSAGES)
    engine = llm._get_engine()
    assert llm.get_num_tokens("Call me Ishmael.") == len(engine.encode("Call me Ishmael."))
    assert llm.profile["max_input_tokens"] == engine.context_window


def test_repeated_prompt_reports_the_reused_prefix_as_cache_read(checkpoint):
    llm = ChatJamba(model=checkpoint, max_tokens=4)
    llm.invoke(MESSAGES)
    again = llm.invoke(MESSAGES).usage_metadata
    assert 0 < again["input_token_details"]["cache_read"] <= again["input_tokens"]


def test_stream_joins_to_invoke_with_usage_and_metadata_on_the_last_chunk_only(checkpoint):
    llm = ChatJamba(model=checkpoint, max_tokens=12)
    whole = llm.invoke(MESSAGES)
    chunks = list(llm.stream(MESSAGES))
    assert [i for i, c in enumerate(chunks) if c.usage_metadata] == [len(chunks) - 1]
    assert [i for i, c in enumerate(chunks) if c.response_metadata.get("model_name")] == [len(chunks) - 1]
    full = _merge(chunks)
    assert full.content == whole.content
    for key in ("input_tokens", "output_tokens", "total_tokens"):  # cache_read may differ: prefix reuse
        assert full.usage_metadata[key] == whole.usage_metadata[key]
    meta = full.response_metadata
    assert meta["model_name"] == checkpoint and meta["finish_reason"] in ("stop", "length")
    for key in ("time_to_first_token", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert isinstance(meta[key], float) and meta[key] >= 0
    assert meta["citations"] == []


def test_stop_strings_cut_the_answer(checkpoint):
    llm = ChatJamba(model=checkpoint, max_tokens=12)
    full = llm.invoke(MESSAGES).content
    words = full.split()
    if len(words) < 3:
        pytest.skip(f"answer too short to cut: {full!r}")
    cut = llm.invoke(MESSAGES, stop=[words[2]]).content
    assert cut == full[: full.index(words[2])].strip()


def test_streamed_tool_call_chunks_merge_to_the_invoked_calls_with_nested_args(checkpoint):
    llm = ChatJamba(model=checkpoint, max_tokens=128).bind_tools([magic_function, Order], tool_choice="Order")
    whole = llm.invoke("Order two red picks, quickly.")
    assert len(whole.tool_calls) == 1 and whole.tool_calls[0]["name"] == "Order"
    args = whole.tool_calls[0]["args"]
    assert isinstance(args["pick"], dict)  # nested objects come back as objects, never as JSON text
    Order.model_validate(args)
    streamed = _merge(llm.stream("Order two red picks, quickly."))
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"]) for c in whole.tool_calls]
    assert all(c["id"] and c["id"].startswith("call_") for c in streamed.tool_calls)
    assert whole.response_metadata["finish_reason"] == "tool_calls"


def test_cut_off_tool_call_is_invalid_whether_invoked_or_streamed(checkpoint):
    llm = ChatJamba(model=checkpoint, max_tokens=6).bind_tools([magic_function], tool_choice="magic_function")
    whole = llm.invoke("What is magic_function(3)?")
    assert whole.tool_calls == [] and len(whole.invalid_tool_calls) == 1
    assert whole.response_metadata["finish_reason"] == "length"
    streamed = _merge(llm.stream("What is magic_function(3)?"))
    assert streamed.tool_calls == [] and len(streamed.invalid_tool_calls) == 1


def test_tool_choice_none_never_calls(checkpoint):
    llm = ChatJamba(model=checkpoint, max_tokens=24).bind_tools([magic_function, Order], tool_choice="none")
    for prompt in ("What is magic_function(3)? Use the tool.", "Order a red pick."):
        msg = llm.invoke(prompt)
        assert msg.tool_calls == [] and msg.invalid_tool_calls == []


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_structured_output_returns_nested_objects(checkpoint, method):
    llm = ChatJamba(model=checkpoint, max_tokens=128)  # the tiny tokenizer spends about 70 tokens on this call
    order = llm.with_structured_output(Order, method=method).invoke("Order two red picks, quickly.")
    assert isinstance(order, Order) and isinstance(order.pick, Pick)
    as_dict = llm.with_structured_output(Order.model_json_schema(), method=method).invoke("Order two red picks.")
    assert isinstance(as_dict["pick"], dict) and set(as_dict) == {"pick", "rush"}


def test_structured_output_include_raw(checkpoint):
    llm = ChatJamba(model=checkpoint, max_tokens=128)
    out = llm.with_structured_output(Pick, include_raw=True).invoke("Pick a colour.")
    assert set(out) == {"raw", "parsed", "parsing_error"}
    assert out["raw"].tool_calls and isinstance(out["parsed"], Pick) and out["parsing_error"] is None
    # a cut-off answer is reported, not raised
    short = ChatJamba(model=checkpoint, max_tokens=4).with_structured_output(Pick, method="json_schema", include_raw=True)
    out = short.invoke("Pick a colour.")
    assert out["parsed"] is None and out["parsing_error"] is not None and out["raw"].response_metadata["finish_reason"] == "length"


def test_documents_per_call_and_citation_mode(checkpoint):
    llm = ChatJamba(model=checkpoint, max_tokens=16, citations=True)
    docs = [Document("Call me Ishmael.", metadata={"title": "Loomings"}), "The Pequod sails from Nantucket."]
    msg = llm.invoke("Who is the narrator?", documents=docs)
    assert isinstance(msg.response_metadata["citations"], list)
    assert all(isinstance(i, int) for i in msg.response_metadata["citations"])
    engine = llm._get_engine()
    prompt = engine.render([{"role": "user", "content": "Who is the narrator?"}], documents=[
        {"text": "Call me Ishmael.", "title": "Loomings"}, {"text": "The Pequod sails from Nantucket."}], citations=True)
    assert msg.usage_metadata["input_tokens"] == len(engine.encode([{"role": "user", "content": "Who is the narrator?"}],
                                                                   documents=[{"text": "Call me Ishmael.", "title": "Loomings"},
                                                                              {"text": "The Pequod sails from Nantucket."}],
                                                                   citations=True))
    assert "Loomings" in prompt and "Nantucket" in prompt
    with pytest.raises(ValueError, match="document 0"):
        llm.invoke("hi", documents=[42])


def test_engines_are_shared_and_an_engine_instance_is_accepted(checkpoint, tiny_engine):
    a, b = ChatJamba(model=checkpoint, max_tokens=4), ChatJamba(model=checkpoint, max_tokens=8, temperature=0.7)
    assert a._get_engine() is b._get_engine()
    if TEST_MODEL is None:
        direct = ChatJamba(model=tiny_engine, max_tokens=4)
        assert direct._get_engine() is tiny_engine and direct.model == str(tiny_engine.path)
        assert direct.invoke("Hello").content == a.invoke("Hello").content


def test_media_content_is_refused_before_generation(checkpoint):
    image = {"type": "image", "base64": "AAAA", "mime_type": "image/png"}
    with pytest.raises(ValueError, match="text only"):
        ChatJamba(model=checkpoint).invoke([HumanMessage([{"type": "text", "text": "describe"}, image])])
