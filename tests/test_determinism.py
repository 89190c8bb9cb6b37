"""Same request, same seed, same output, whatever the KV cache held before (engine.py's docstring).

Each test serves a request cold (empty cache), then serves other requests that leave the cache
holding a shared prefix (cut mid-chunk, partial last chunks, decoded tokens), then the first request
again, and wants bit-identical logits and identical tokens. The old rule (reuse the longest shared
prefix, chunks starting wherever reuse ended) fails them: chunk lengths and decode-vs-prefill kernels
round differently.
"""

from __future__ import annotations

import pytest
import torch

import zlocal
from zlocal.errors import InvalidArgumentError
from zlocal.inference.engine import DEFAULT_PREFILL_CHUNK, HISTORY_LEN

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening, counting the steps aloud, "
    "checking the lamp, the lens and the clockwork that turned them, and writing the weather "
    "into a logbook that nobody but the supply boat captain would ever read. "
)
SYSTEM = "You are a helpful assistant."


def _greedy(rt, ids, n=12, **kw):
    with rt.engine.without_stop_tokens():
        return rt.generate(ids, max_new_tokens=n, **{"temperature": 0, **kw}).token_ids


def _serve(rt, prompt):
    """Logits, greedy tokens and seeded sampled tokens of ``prompt`` from the current cache."""
    e = rt.engine
    logits = e.prefill(prompt).clone()
    return logits, _greedy(rt, prompt), _greedy(rt, prompt, temperature=1.0, seed=3)


def _check_cache_independent(rt, prompt, others):
    """``prompt`` served after each of ``others`` (plus decode steps) equals it served cold."""
    e = rt.engine
    e.reset()
    cold = _serve(rt, prompt)
    for other in others:
        _greedy(rt, other, n=5)  # leaves other's prompt and 5 decoded tokens in the cache
        warm = _serve(rt, prompt)
        assert e.stats.last_reused > 0  # the cache was reused, not thrown away
        assert torch.equal(warm[0], cold[0]), f"logits differ after a request of {len(other)} tokens"
        assert warm[1:] == cold[1:]


def _others(prompt, tail, chunk):
    """Requests sharing a prefix with ``prompt``: cut mid-chunk, at a chunk boundary, the whole
    prompt plus more, and the prompt's first part followed by decoded tokens."""
    return [
        prompt[: chunk + chunk // 2] + tail,
        prompt[: 2 * chunk] + tail,
        prompt + tail,
        prompt[: len(prompt) - 3],
    ]


@pytest.mark.parametrize("fast", [True, False], ids=["lean", "hf"])
def test_tiny_same_output_whatever_the_cache_held(tiny_runtime, fast):
    rt, e = tiny_runtime, tiny_runtime.engine
    saved = e.fast
    e.fast = saved if fast else None
    e.prefill_chunk = 8
    try:
        prompt = rt.encode(TEXT)[:60]
        tail = rt.encode(" Ships!", add_special_tokens=False)
        _check_cache_independent(rt, prompt, _others(prompt, tail, 8))
    finally:
        e.fast = saved
        e.prefill_chunk = DEFAULT_PREFILL_CHUNK


def test_reuse_keeps_only_full_aligned_prefill_chunks(tiny_runtime):
    rt, e = tiny_runtime, tiny_runtime.engine
    e.prefill_chunk = 8
    try:
        ids = rt.encode(TEXT)[:20]
        out = _greedy(rt, ids, n=8)
        assert e.exact_len == 16  # positions 16..19 came from a partial chunk, 20.. from decode steps
        assert e.cached_ids == ids + out[:7]  # the prompt and the decoded tokens fed back
        assert e.reusable([*ids, *out[:7], 13, 13]) == 16  # decoded tokens are prefilled again
        assert e.reusable([*ids[:13], 13]) == 8  # a prefix cut mid-chunk rounds down
        assert e.reusable([*ids[:16], 13]) == 16
        assert e.reusable(ids[:16]) == 8  # the last token always runs
        e.prefill_chunk = 4  # other boundaries: nothing cached is reusable
        assert e.cached_ids == [] and e.reusable(ids) == 0
    finally:
        e.prefill_chunk = DEFAULT_PREFILL_CHUNK


def _check_session(rt, chunk, monkeypatch, max_new_tokens=10):
    """Each turn of a chat session (earlier replies written by decode steps) equals the same
    messages sent cold, logits and text."""
    e = rt.engine
    logits = []  # what each request's prefill returned
    prefill = e.prefill
    monkeypatch.setattr(e, "prefill", lambda ids: logits.append(prefill(ids).clone()) or logits[-1])
    e.prefill_chunk = chunk
    kw = dict(temperature=0.8, max_new_tokens=max_new_tokens)
    try:
        s = rt.session(system=SYSTEM)
        replies = []
        for i in range(3):
            replies.append(s.send(f"Tell me fact {i} about lighthouses.", seed=i, **kw))
            assert i == 0 or e.stats.last_reused > 0
        turns = list(logits)
        for i, reply in enumerate(replies):
            e.reset()
            msgs = [{"role": "system", "content": SYSTEM}, *s.messages[: 2 * i + 1]]
            assert rt.chat(msgs, seed=i, **kw) == reply
            assert torch.equal(logits[-1], turns[i]), f"turn {i}"
    finally:
        e.prefill_chunk = DEFAULT_PREFILL_CHUNK


def test_tiny_session_turns_equal_cold_requests(tiny_runtime, monkeypatch):
    _check_session(tiny_runtime, 8, monkeypatch)


def test_history_keeps_only_the_last_calls(tiny_runtime):
    e = tiny_runtime.engine
    bos = tiny_runtime.encode("")
    for n in range(HISTORY_LEN + 5):
        e.reset()
        e.prefill(bos + [100] * n)
    assert list(e.stats.history) == [(0, len(bos) + n) for n in range(5, HISTORY_LEN + 5)]


@pytest.fixture(scope="module")
def smollm2_int4(smollm2):
    from zlocal.inference.bench import cpu_plan

    plan = cpu_plan(str(smollm2), "int4", dtype="bfloat16", max_context=512)
    return zlocal.load(str(smollm2), plan=plan, dtype="bfloat16", max_context=512)


def test_smollm2_int4_same_output_whatever_the_cache_held(smollm2_int4):
    rt = smollm2_int4
    prompt = rt.encode_chat([{"role": "user", "content": "Summarize: " + TEXT * 6}])
    assert len(prompt) > 2 * rt.engine.prefill_chunk
    tail = rt.encode("\nNo, tell me about ships.", add_special_tokens=False)
    _check_cache_independent(rt, prompt, _others(prompt, tail, rt.engine.prefill_chunk))


def test_smollm2_int4_session_turns_equal_cold_requests(smollm2_int4, monkeypatch):
    # replies of 16+ tokens cross a chunk boundary: reusing their decode-written positions would
    # show (the decode kernel and the prompt GEMM round differently)
    _check_session(smollm2_int4, 16, monkeypatch, max_new_tokens=24)


def test_empty_prompt_is_refused_and_keeps_the_cache(tiny_runtime):
    e = tiny_runtime.engine
    e.reset()
    ids = list(range(5, 5 + 2 * e.prefill_chunk))
    e.prefill(ids)
    with pytest.raises(InvalidArgumentError, match="empty"):
        e.prefill([])
    assert e.cached_ids == ids and e.exact_len == 2 * e.prefill_chunk
