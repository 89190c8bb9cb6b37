"""Embedding the Runtime: cancel before a stream starts, half-consumed streams, session streams."""

from __future__ import annotations

import threading

import pytest

from zlocal.errors import BusyError

LONG = {"temperature": 0, "max_new_tokens": 30}


def test_cancel_before_the_first_next_ends_the_stream_at_once(tiny_runtime):
    rt = tiny_runtime
    calls = rt.engine.stats.calls
    with rt.engine.without_stop_tokens():
        stream = rt.stream_generate("Hello", **LONG)
        rt.cancel()
        out = list(stream)
        # a stream created after the cancel is not affected by it
        after = list(rt.stream_generate("Hello", **LONG))
    assert [(r.finish_reason, r.generation_tokens, r.token) for r in out] == [("cancelled", 0, None)]
    assert out[0].prompt_tokens == len(rt.encode("Hello"))
    assert rt.engine.stats.calls == calls + 1  # the cancelled stream never prefilled
    assert after[-1].finish_reason == "length" and after[-1].generation_tokens == 30
    assert not rt.busy


def test_cancel_also_ends_a_stream_waiting_for_the_lock(tiny_runtime):
    rt = tiny_runtime
    with rt.engine.without_stop_tokens():
        first = rt.stream_generate("Hello", **LONG)
        next(first)
        second = rt.stream_generate("Hi", **LONG)  # created, not started
        rt.cancel()
        assert list(first)[-1].finish_reason == "cancelled"
        assert [r.finish_reason for r in second] == ["cancelled"]


def test_lock_is_given_back_with_the_last_response(tiny_runtime):
    rt = tiny_runtime
    stream = rt.stream_generate("Hello", temperature=0, max_new_tokens=3)
    last = next(r for r in stream if r.finish_reason is not None)
    assert last.finish_reason in ("stop", "length")
    assert not rt.busy  # no extra next() needed
    assert list(stream) == []


def test_a_paused_stream_of_this_thread_is_ended_by_its_next_request(tiny_runtime):
    rt = tiny_runtime
    with rt.engine.without_stop_tokens():
        held = rt.stream_generate("Hello", **LONG)
        first = next(held)
        assert rt.busy
        with pytest.raises(BusyError, match="this thread left half-consumed"):
            rt.generate("Hi", max_new_tokens=2, wait=False)  # a probe ends nothing
        # before the fix: BusyError after the timeout (or a deadlock without one)
        done = rt.generate("Hi", temperature=0, max_new_tokens=2, timeout=5)
        rest = list(held)
    assert done.completion_tokens == 2
    assert [(r.finish_reason, r.generation_tokens) for r in rest] == [("cancelled", first.generation_tokens)]


def test_a_dropped_stream_gives_the_runtime_back(tiny_runtime):
    rt = tiny_runtime
    held = rt.stream_generate("Hello", **LONG)
    next(held)
    del held
    assert not rt.busy


def test_a_stream_left_by_an_exited_thread_is_ended(tiny_runtime):
    rt = tiny_runtime
    kept = []

    def start():
        kept.append(rt.stream_generate("Hello", **LONG))
        next(kept[0])

    t = threading.Thread(target=start)
    t.start()
    t.join()
    with rt.engine.without_stop_tokens():
        assert rt.generate("Hi", temperature=0, max_new_tokens=2, timeout=5).completion_tokens == 2
    assert list(kept[0])[-1].finish_reason == "cancelled"


def test_a_paused_stream_of_another_live_thread_is_waited_for(tiny_runtime):
    rt = tiny_runtime
    started, release = threading.Event(), threading.Event()
    results = []

    def consumer():
        stream = rt.stream_generate("Hello", temperature=0, max_new_tokens=4)
        next(stream)
        started.set()
        release.wait(10)
        results.extend(stream)

    t = threading.Thread(target=consumer)
    t.start()
    try:
        assert started.wait(10)
        with pytest.raises(BusyError, match="another generation"):
            rt.generate("Hi", max_new_tokens=2, timeout=0.3)
    finally:
        release.set()
        t.join(10)
    assert results[-1].finish_reason in ("stop", "length")  # it was not ended


def test_session_stream_accepts_a_cancel_event(tiny_runtime):
    s = tiny_runtime.session()
    ev = threading.Event()
    with tiny_runtime.engine.without_stop_tokens():
        stream = s.stream("Hi", cancel=ev, **LONG)
        first = next(stream)
        ev.set()
        rest = list(stream)
    assert rest[-1].finish_reason == "cancelled"
    assert rest[-1].generation_tokens <= first.generation_tokens + 1
    assert [m["role"] for m in s.messages] == ["user", "assistant"]  # the partial reply is kept


def test_session_stream_never_consumed_leaves_no_turn(tiny_runtime):
    s = tiny_runtime.session()
    s.stream("First", temperature=0, max_new_tokens=2)
    assert s.messages == []
    s.send("Second", temperature=0, max_new_tokens=2)
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    assert s.messages[0]["content"] == "Second"


def test_session_turn_cancelled_before_it_started_is_rolled_back(tiny_runtime):
    s = tiny_runtime.session()
    s.send("First", temperature=0, max_new_tokens=2)
    history = list(s.messages)
    ev = threading.Event()
    ev.set()
    out = list(s.stream("Second", cancel=ev, temperature=0, max_new_tokens=2))
    assert [r.finish_reason for r in out] == ["cancelled"]
    assert s.messages == history


def test_session_streams_created_together_run_in_order_of_consumption(tiny_runtime):
    s = tiny_runtime.session()
    first = s.stream("First", temperature=0, max_new_tokens=2)
    second = s.stream("Second", temperature=0, max_new_tokens=2)
    list(first)
    list(second)  # planned before "First" entered the history: planned again at its start
    assert [(m["role"], m["content"]) for m in s.messages[::2]] == [("user", "First"), ("user", "Second")]
    assert len(s.messages) == 4
