"""ChatJamba's async path: generation in a worker thread, the event loop free, requests never mixed."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

pytest.importorskip("langchain_core")

from langchain_core.messages import AIMessageChunk  # noqa: E402

from langchain_jamba import ChatJamba  # noqa: E402

pytestmark = pytest.mark.asyncio

PROMPTS = ["Call me Ishmael.", "What is a whale?", "Tell me about the sea.", "Where is Nantucket?"]


REAL_MODEL = os.environ.get("JAMBA_LOCAL_TEST_MODEL")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> str:
    return REAL_MODEL or str(tiny_checkpoint)


async def _with_ticker(work):
    """Run `work` while a ticker task sleeps 10 ms at a time; -> (result, ticks, longest gap in s)."""
    ticks, gaps = 0, [0.0]

    async def ticker():
        nonlocal ticks
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        result = await work
    finally:
        task.cancel()
    return result, ticks, max(gaps)


async def test_concurrent_ainvoke_equal_sequential_runs_and_loop_stays_responsive(checkpoint):
    llm = ChatJamba(model=checkpoint, max_tokens=24, temperature=0)
    sequential = [llm.invoke(p) for p in PROMPTS]

    start = time.perf_counter()
    concurrent, ticks, longest_gap = await _with_ticker(asyncio.gather(*(llm.ainvoke(p) for p in PROMPTS)))
    elapsed = time.perf_counter() - start

    for alone, together in zip(sequential, concurrent):
        assert together.content == alone.content
        # token counts match; `cache_read` may differ (the engine reuses prompt prefixes it has seen)
        for key in ("input_tokens", "output_tokens", "total_tokens"):
            assert together.usage_metadata[key] == alone.usage_metadata[key]
        assert together.response_metadata["finish_reason"] == alone.response_metadata["finish_reason"]
    # the loop ran its ticker throughout: at least a third of the 10 ms ticks, no stall of a quarter second
    # (at least one tick, not five: with the fallback tokenizer's short prompts the four calls can finish in
    # 50 ms, which allowed only four ticks and failed a fresh clone without ../shared)
    assert ticks >= max(1, int(elapsed / 0.01 / 3)), (ticks, elapsed)
    assert longest_gap < 0.25, longest_gap


async def test_concurrent_astreams_equal_sequential_streams(checkpoint):
    llm = ChatJamba(model=checkpoint, max_tokens=16)

    async def collect(prompt):
        chunks = [c async for c in llm.astream(prompt)]
        assert all(isinstance(c, AIMessageChunk) for c in chunks)
        assert sum(1 for c in chunks if c.usage_metadata) == 1 and chunks[-1].usage_metadata
        assert chunks[-1].chunk_position == "last"
        return "".join(c.text for c in chunks)

    texts, ticks, longest_gap = await _with_ticker(asyncio.gather(*(collect(p) for p in PROMPTS)))
    assert texts == [llm.invoke(p).content for p in PROMPTS]
    assert longest_gap < 0.25, longest_gap


@pytest.mark.parametrize("streamed", [False, True])
async def test_cancelled_request_stops_generating_and_frees_the_engine(checkpoint, monkeypatch, streamed):
    llm = ChatJamba(model=checkpoint, max_tokens=20000)
    engine = llm._get_engine()
    steps = 0
    decode_one_token = engine.decode_one_token

    def slow_step(*args, **kwargs):  # 20 ms a token: uncancelled, the request would hold the engine for minutes
        nonlocal steps
        steps += 1
        time.sleep(0.02)
        return decode_one_token(*args, **kwargs)

    monkeypatch.setattr(engine, "decode_one_token", slow_step)

    async def consume():
        if streamed:
            return [c async for c in llm.astream("Tell me a long story.")]
        return await llm.ainvoke("Tell me a long story.")

    task = asyncio.create_task(consume())
    while steps < 3 and not task.done():  # cancel mid-decode (a real checkpoint may take a while to prefill)
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    def engine_free_within(seconds):
        if not engine.lock.acquire(timeout=seconds):
            return False
        engine.lock.release()
        return True

    # a token or two after the cancel (a real checkpoint's decode step may take seconds on a CPU)
    assert await asyncio.to_thread(engine_free_within, 30 if REAL_MODEL else 2), "the cancelled request still holds the engine"
    stopped_at = steps
    assert stopped_at < 150
    await asyncio.sleep(0.2)
    assert steps == stopped_at


async def test_async_errors_surface_in_the_caller(checkpoint, tmp_path):
    with pytest.raises(TypeError, match="bogus"):
        await ChatJamba(model=checkpoint).ainvoke("hi", bogus=1)
    with pytest.raises((FileNotFoundError, ValueError, OSError)):
        await ChatJamba(model=str(tmp_path / "missing")).ainvoke("hi")
    with pytest.raises(TypeError, match="bogus"):
        [c async for c in ChatJamba(model=checkpoint).astream("hi", bogus=1)]
