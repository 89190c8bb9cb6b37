"""asyncio streams: ``async for r in rt.astream_chat(...)`` leaves the event loop running, and
closing or cancelling the iterator stops the generation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from zlocal.errors import ContextOverflowError

MSGS = [{"role": "user", "content": "Hi"}]


class SlowEvent(threading.Event):
    """A cancel event whose poll (once per token, on the generating thread) takes ``delay`` seconds:
    a generation that blocks whoever runs it for a known time."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def is_set(self) -> bool:
        time.sleep(self.delay)
        return super().is_set()


async def _tick(gaps: list[float], stop: asyncio.Event) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.002)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


def test_the_event_loop_keeps_ticking_while_generating(tiny_runtime):
    rt = tiny_runtime

    async def main():
        gaps, stop = [], asyncio.Event()
        ticker = asyncio.create_task(_tick(gaps, stop))
        await asyncio.sleep(0.01)
        gaps.clear()
        out = [r async for r in rt.astream_chat(MSGS, temperature=0, max_new_tokens=5, cancel=SlowEvent(0.1))]
        stop.set()
        await ticker
        return gaps, out

    with rt.engine.without_stop_tokens():
        gaps, out = asyncio.run(main())
    assert out[-1].finish_reason == "length" and out[-1].generation_tokens == 5
    # 5 token steps of >= 100 ms each: a loop blocked by them would show a gap of 100 ms or more
    assert len(gaps) >= 20 and max(gaps) < 0.075, (len(gaps), max(gaps))


def test_aclose_cancels_the_generation(tiny_runtime):
    rt = tiny_runtime
    before = rt.engine.stats.generated_tokens

    async def main():
        agen = rt.astream_generate("Hello", temperature=0, max_new_tokens=400, cancel=SlowEvent(0.01))
        first = await agen.__anext__()
        await agen.aclose()
        return first

    with rt.engine.without_stop_tokens():
        first = asyncio.run(main())
        _wait_idle(rt)
    assert first.generation_tokens == 1
    assert rt.engine.stats.generated_tokens - before < 50  # not the 400 asked for


def test_cancelling_the_task_cancels_the_generation(tiny_runtime):
    rt = tiny_runtime
    before = rt.engine.stats.generated_tokens

    async def main():
        got = asyncio.Event()

        async def consume():
            async for _ in rt.astream_chat(MSGS, temperature=0, max_new_tokens=400, cancel=SlowEvent(0.01)):
                got.set()

        task = asyncio.create_task(consume())
        await got.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with rt.engine.without_stop_tokens():
        asyncio.run(main())
        _wait_idle(rt)
    assert rt.engine.stats.generated_tokens - before < 50


def test_errors_reach_the_async_iterator(tiny_runtime):
    async def main():
        async for _ in tiny_runtime.astream_generate("Hi", max_new_tokens=10**6):
            pass

    with pytest.raises(ContextOverflowError):
        asyncio.run(main())


def _wait_idle(rt, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while rt.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not rt.busy
