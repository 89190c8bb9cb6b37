"""Multi-turn sessions keep the KV cache and prefill only the new turn; truncation policy."""

from __future__ import annotations

import pytest

from zlocal.errors import ContextOverflowError, InvalidArgumentError
from zlocal.inference.engine import DEFAULT_PREFILL_CHUNK


def test_second_turn_prefills_only_new_tokens(smollm2_runtime):
    rt = smollm2_runtime
    chunk = 8  # small aligned prefill chunks: reuse ends at most 7 tokens before turn 1's prompt does
    rt.engine.prefill_chunk = chunk
    try:
        s = rt.session(system="You are terse.")
        s.send("Name a fruit.", temperature=0, max_new_tokens=16)
        first_prompt = rt.engine.stats.history[-1][1]
        s.send("Name another one.", temperature=0, max_new_tokens=16)
        reused, prefilled = rt.engine.stats.history[-1]
    finally:
        rt.engine.prefill_chunk = DEFAULT_PREFILL_CHUNK
    system = {"role": "system", "content": "You are terse."}
    full_prompt = len(rt.encode_chat([system, *s.messages[:-1]]))
    assert reused + prefilled == full_prompt
    # turn 1's prompt comes from the cache down to its last chunk boundary; the reply, which decode
    # steps wrote, is prefilled again (engine.py: exact reuse)
    assert reused == first_prompt - first_prompt % chunk > 0
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]


def test_session_reply_equals_stateless_chat(tiny_runtime):
    rt = tiny_runtime
    s = rt.session()
    s.send("Hello", temperature=0, max_new_tokens=6)
    second = s.send("More", temperature=0, max_new_tokens=6)
    rt.engine.reset()
    assert rt.chat(s.messages[:-1], temperature=0, max_new_tokens=6) == second


def test_reset_and_system(tiny_runtime):
    s = tiny_runtime.session(system="sys")
    s.send("Hi", temperature=0, max_new_tokens=2)
    s.set_system("other")
    assert s.messages == [] and s.system == "other"
    s.send("Hi", temperature=0, max_new_tokens=2)
    s.reset()
    assert s.messages == []


def test_truncation_drops_oldest_turns(tiny_zephyr):
    import zlocal

    rt = zlocal.load(str(tiny_zephyr), dtype="float32", max_context=120)
    s = rt.session(system="Be brief.")
    for i in range(6):
        s.send(f"Message number {i} with a few words in it.", temperature=0, max_new_tokens=10)
    assert s.dropped_turns > 0
    assert s.messages[-2]["content"].startswith("Message number 5")
    assert all("Message number 0" not in m["content"] for m in s.messages)


def test_truncation_error_policy(tiny_zephyr):
    import zlocal

    rt = zlocal.load(str(tiny_zephyr), dtype="float32", max_context=80)
    s = rt.session(truncate="error")
    with pytest.raises(ContextOverflowError):
        for i in range(10):
            s.send(f"Message number {i} with a few words in it.", temperature=0, max_new_tokens=10)
    with pytest.raises(InvalidArgumentError):
        rt.session(truncate="middle")


def test_single_message_too_long_is_an_error_and_not_kept(tiny_runtime):
    s = tiny_runtime.session()
    with pytest.raises(ContextOverflowError):
        s.send("word " * 600, max_new_tokens=10)
    assert s.messages == []
