"""A LangChain agent (`langchain.agents.create_agent`) running its full loop on ChatJamba."""

from __future__ import annotations

import os
from typing import Literal

import pytest

pytest.importorskip("langchain.agents")

from langchain.agents import create_agent  # noqa: E402
from langchain.agents.middleware import wrap_model_call  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from langchain_core.utils.function_calling import convert_to_openai_tool  # noqa: E402

from langchain_jamba import ChatJamba  # noqa: E402
from langchain_jamba.chat_models import _convert_messages  # noqa: E402

City = Literal["Paris", "Tokyo", "Nantucket"]  # enum arguments: a forced call on random weights ends quickly


@tool
def get_weather(city: City) -> str:
    """Get today's weather in a city."""
    return {"Paris": "rain, 12 C", "Tokyo": "sun, 24 C", "Nantucket": "fog, 9 C"}[city]


@tool
def get_population(city: City) -> int:
    """Get the number of people who live in a city."""
    return {"Paris": 2_102_650, "Tokyo": 13_960_000, "Nantucket": 14_255}[city]


TOOLS = [get_weather, get_population]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> str:
    return os.environ.get("JAMBA_LOCAL_TEST_MODEL") or str(tiny_checkpoint)


def test_agent_loop_forced_tool_call_results_reach_the_second_model_call(checkpoint):
    llm = ChatJamba(model=checkpoint, max_tokens=96)
    calls: list[list] = []  # the messages of each model call

    @wrap_model_call
    def tools_then_answer(request, handler):
        """First model call: some tool must be called; after the tool results: answer in text."""
        calls.append([request.system_message, *request.messages] if request.system_message else list(request.messages))
        answered = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(tool_choice="none" if answered else "any"))

    agent = create_agent(llm, TOOLS, system_prompt="Answer with the tools.", middleware=[tools_then_answer])
    state = agent.invoke({"messages": [HumanMessage("How is the weather in Paris, and how many people live there?")]})
    messages = state["messages"]

    assert len(calls) == 2, "the agent should call the model twice: tool calls, then the answer"
    first = next(m for m in messages if isinstance(m, AIMessage))
    assert first.tool_calls, "tool_choice='any' must produce a tool call"
    assert {c["name"] for c in first.tool_calls} <= {"get_weather", "get_population"}
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert [r.tool_call_id for r in results] == [c["id"] for c in first.tool_calls]
    for call, result in zip(first.tool_calls, results):
        assert result.content == str({"get_weather": get_weather, "get_population": get_population}[call["name"]].invoke(call["args"]))

    # the second model call saw every tool result, in the prompt the model actually read
    second = calls[1]
    assert [m.tool_call_id for m in second if isinstance(m, ToolMessage)] == [c["id"] for c in first.tool_calls]
    engine = llm._get_engine()
    prompt = engine.render(_convert_messages(second), tools=[convert_to_openai_tool(t) for t in TOOLS])
    for result in results:
        assert result.content in prompt
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert final.usage_metadata["input_tokens"] == llm.get_num_tokens_from_messages(second, tools=TOOLS)
