"""asyncio for the adapters: a blocking generator run in a worker thread, its items yielded on the loop."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any, AsyncIterator, Callable, Iterator

_END = object()


async def iterate_in_thread(make_iterator: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Run ``make_iterator()`` in a worker thread and yield its items on the event loop.

    Items cross through an `asyncio.Queue` (``call_soon_threadsafe``), so the loop never waits on the
    model; the worker runs in a copy of the caller's context (instrumentation spans follow it). An
    exception in the worker is raised in the consumer. When the consumer stops early (break,
    cancellation) the worker stops at its next item and closes the iterator, which ends generation and
    releases the engine.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def put(item: Any, error: BaseException | None = None) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
            return True
        except RuntimeError:  # the loop has closed: nobody is listening
            stop.set()
            return False

    def work() -> None:
        try:
            iterator = make_iterator()
            try:
                for item in iterator:
                    if stop.is_set() or not put(item):
                        break
            finally:
                getattr(iterator, "close", lambda: None)()
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            put(_END, error)
            return
        put(_END)

    context = contextvars.copy_context()
    threading.Thread(target=context.run, args=(work,), name="jamba-local-stream", daemon=True).start()
    try:
        while True:
            item, error = await queue.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
