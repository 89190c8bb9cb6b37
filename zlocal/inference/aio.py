"""asyncio streams over the Runtime: the blocking generator runs on a worker thread.

``astream(make_stream, *args, **sampling)`` starts one daemon thread that builds the stream (with a
cancel event of its own) and iterates it, handing every response to the event loop with
``loop.call_soon_threadsafe``; the loop only awaits an ``asyncio.Queue``, so it keeps running while
the model computes. Leaving the ``async for`` early (``break``, ``aclose()``, the task cancelled,
or an exception) sets the cancel event: the generation stops within one token and the thread ends.
Errors raised while building or running the stream are raised from the iterator.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from zlocal.inference.engine import GenerationResponse

_DONE = object()


class _Failed:
    """An exception raised on the worker thread, carried to the event loop."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def _pump(make_stream, args, sampling, cancel, put) -> None:
    """Worker thread: build and run the stream, handing each item to ``put`` (thread-safe)."""
    try:
        stream = make_stream(*args, cancel=cancel, **sampling)
        for r in stream:
            put(r)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the awaiting coroutine
        put(_Failed(exc))
    finally:
        put(_DONE)


async def astream(
    make_stream: Callable[..., Iterator[GenerationResponse]], *args, **sampling
) -> AsyncIterator[GenerationResponse]:
    """Iterate ``make_stream(*args, cancel=event, **sampling)`` without blocking the event loop."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    # The caller's own ``cancel=`` event still works: the stream polls both.
    cancel = _Either(sampling.pop("cancel", None))

    def put(item) -> None:
        # RuntimeError: the loop closed while the thread ran; nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, item)

    worker = threading.Thread(
        target=_pump, args=(make_stream, args, sampling, cancel, put), name="zlocal-astream", daemon=True
    )
    worker.start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        cancel.set()  # left early (or done): stop the generation within a token


class _Either(threading.Event):
    """Set when this event or the caller's ``other`` event (if any) is set."""

    def __init__(self, other: threading.Event | None):
        super().__init__()
        self._other = other

    def is_set(self) -> bool:
        return super().is_set() or (self._other is not None and self._other.is_set())
