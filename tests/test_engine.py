"""The lean engine against transformers' generate, plus stops, limits, cancellation and reuse."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from zlocal.errors import BusyError, ContextOverflowError
from zlocal.inference.engine import DEFAULT_PREFILL_CHUNK

LONG_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening, counting the steps aloud, "
    "checking the lamp, the lens and the clockwork that turned them, and writing the weather "
    "into a logbook that nobody but the supply boat captain would ever read."
)


def reference_model(path, dtype=torch.float32):
    """The checkpoint loaded by transformers alone, never passed through zlocal. zlocal's lean
    forward fuses q/k/v and gate/up and re-points (or packs) the HF modules' weights, so a model it
    loaded runs its own fusion even through the HF forward: comparing with that would hide a wrong
    fusion."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


@pytest.fixture(scope="module")
def hf_tiny(tiny_zephyr):
    return reference_model(tiny_zephyr)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2):
    return reference_model(smollm2)


def hf_greedy(model, ids, n):
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # run exactly n steps, like ours below
    try:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    finally:
        model.generation_config.eos_token_id = saved
    return out[0, len(ids) :].tolist()


def ours_greedy(rt, ids, n, chunk=None):
    rt.engine.reset()
    if chunk:
        rt.engine.prefill_chunk = chunk
    try:
        # stop tokens disabled so both sides run exactly n steps
        with rt.engine.without_stop_tokens():
            return rt.generate(ids, temperature=0, max_new_tokens=n, repetition_penalty=1.0).token_ids
    finally:
        rt.engine.prefill_chunk = DEFAULT_PREFILL_CHUNK


def test_greedy_matches_hf_generate_tiny(tiny_runtime, hf_tiny):
    ids = tiny_runtime.encode("Hello world, how are you?")
    assert ours_greedy(tiny_runtime, ids, 24) == hf_greedy(hf_tiny, ids, 24)


def test_greedy_matches_hf_beyond_sliding_window(tiny_runtime, hf_tiny):
    window = tiny_runtime.model.config.sliding_window
    ids = tiny_runtime.encode(LONG_TEXT)
    assert len(ids) > window  # the prompt alone is longer than the window
    expected = hf_greedy(hf_tiny, ids, 40)
    assert ours_greedy(tiny_runtime, ids, 40) == expected
    # chunked prefill crosses the window boundary inside a chunk
    assert ours_greedy(tiny_runtime, ids, 40, chunk=13) == expected


def test_greedy_matches_hf_generate_smollm2(smollm2_runtime, hf_smollm2):
    rt = smollm2_runtime
    ids = rt.encode_chat([{"role": "user", "content": "Write one sentence about the sea."}])
    assert ours_greedy(rt, ids, 32) == hf_greedy(hf_smollm2, ids, 32)


def test_stops_on_end_of_turn_and_reports_stop(smollm2_runtime):
    c = smollm2_runtime.chat_completion(
        [{"role": "user", "content": "Say hi."}], temperature=0, max_new_tokens=200
    )
    assert c.finish_reason == "stop"
    assert c.completion_tokens < 200
    assert "<|im_end|>" not in c.text and c.text.strip()


def test_max_new_tokens_gives_length(tiny_runtime):
    # stop tokens off: the random model could otherwise end the text first, and the test would
    # prove nothing about the limit
    with tiny_runtime.engine.without_stop_tokens():
        c = tiny_runtime.generate("Hello", temperature=0, max_new_tokens=5)
    assert c.finish_reason == "length"
    assert c.completion_tokens == len(c.token_ids) == 5


def test_stop_string_is_not_emitted(smollm2_runtime):
    rt = smollm2_runtime
    msgs = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    full = rt.chat(msgs, temperature=0, max_new_tokens=40)
    assert "5" in full
    cut = rt.chat(msgs, temperature=0, max_new_tokens=40, stop=["5"])
    assert "5" not in cut and full.startswith(cut)


def test_same_seed_same_output(tiny_runtime):
    a = tiny_runtime.generate("Once", temperature=1.0, seed=11, max_new_tokens=12).token_ids
    b = tiny_runtime.generate("Once", temperature=1.0, seed=11, max_new_tokens=12).token_ids
    c = tiny_runtime.generate("Once", temperature=1.0, seed=12, max_new_tokens=12).token_ids
    assert a == b and a != c


def test_context_overflow_is_a_clear_error(tiny_runtime):
    ids = list(range(100, 100 + tiny_runtime.max_context - 3))
    with pytest.raises(ContextOverflowError, match="exceeds the context"):
        tiny_runtime.generate(ids, max_new_tokens=10)
    with pytest.raises(ContextOverflowError):
        tiny_runtime.generate(list(range(100, 100 + tiny_runtime.max_context + 5)), max_new_tokens=1)


def test_cancel_from_another_thread_within_one_token(smollm2_runtime):
    rt = smollm2_runtime
    cancel = threading.Event()
    seen_after_cancel = []
    stream = rt.stream_tokens(
        rt.encode("Tell me a long story"), temperature=0, max_new_tokens=500, cancel=cancel
    )
    last = None
    for r in stream:
        if r.generation_tokens == 3 and not cancel.is_set():
            threading.Thread(target=cancel.set).start()
            time.sleep(0.05)
            marker = r.generation_tokens
        elif cancel.is_set() and r.token is not None:
            seen_after_cancel.append(r.generation_tokens)
        last = r
    assert last.finish_reason == "cancelled"
    assert last.generation_tokens <= marker + 1
    assert len(seen_after_cancel) <= 1


def test_runtime_cancel_method(tiny_runtime):
    stream = tiny_runtime.stream_generate("Hello", temperature=0, max_new_tokens=400)
    with tiny_runtime.engine.without_stop_tokens():
        first = next(stream)
        tiny_runtime.cancel()
        rest = list(stream)
    assert rest[-1].finish_reason == "cancelled"
    assert rest[-1].generation_tokens <= first.generation_tokens + 1


def test_one_generation_at_a_time(tiny_runtime):
    stream = tiny_runtime.stream_generate("Hello", temperature=0, max_new_tokens=50)
    next(stream)  # holds the lock
    assert tiny_runtime.busy
    with pytest.raises(BusyError):
        list(tiny_runtime.stream_generate("Hi", max_new_tokens=2, wait=False))
    stream.close()  # abandoning the stream releases the runtime
    assert not tiny_runtime.busy
    assert tiny_runtime.generate("Hi", max_new_tokens=2).completion_tokens >= 1


def test_waiting_caller_runs_after_the_first(tiny_runtime):
    results = []

    def worker(seed):
        results.append(tiny_runtime.generate("Hey", temperature=1.0, seed=seed, max_new_tokens=8).token_ids)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (1, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 3
    assert (
        sorted(map(tuple, results)).count(
            tuple(tiny_runtime.generate("Hey", temperature=1.0, seed=1, max_new_tokens=8).token_ids)
        )
        == 2
    )


def test_prefix_reuse_prefills_only_new_tokens(tiny_runtime):
    rt = tiny_runtime
    a = rt.encode("Hello world, how are you?")
    # ``a`` fills exactly one aligned prefill chunk, the unit of reuse (test_determinism)
    rt.engine.prefill_chunk = len(a)
    try:
        rt.generate(a, temperature=0, max_new_tokens=4)
        b = a + rt.encode(" And then?", add_special_tokens=False)
        rt.generate(b, temperature=0, max_new_tokens=4)
        assert rt.engine.stats.last_reused == len(a)
        assert rt.engine.stats.last_prefilled == len(b) - len(a)
        # reuse gives the same tokens as a cold start
        warm = rt.generate(b, temperature=0, max_new_tokens=6).token_ids
        rt.engine.reset()
        assert rt.generate(b, temperature=0, max_new_tokens=6).token_ids == warm
    finally:
        rt.engine.prefill_chunk = DEFAULT_PREFILL_CHUNK
