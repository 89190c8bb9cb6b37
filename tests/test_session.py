"""Multi-turn sessions keep the KV cache and prefill only the new turn; truncation policy."""

from __future__ import annotations

import pytest

from zlocal.errors import ContextOverflowError, InvalidArgumentError


def test_second_turn_prefills_only_new_tokens(smollm2_runtime):
    rt = smollm2_runtime
    rt.engine.reset()
    s = rt.session(system="You are terse.")
    s.send("Name a fruit.", temperature=0, max_new_tokens=16)
    first_prompt = rt.engine.stats.history[-1][1]
    s.send("Name another one.", temperature=0, max_new_tokens=16)
    reused, prefilled = rt.engine.stats.history[-1]
    full_prompt = len(rt.encode_chat([{"role": "system", "content": "You are terse."}, *s.messages[:-1]]))
    assert reused + prefilled == full_prompt
    assert reused >= first_prompt  # the whole first turn came from the cache
    assert prefilled < 20  # only the end of turn 1 and the new user message
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
