"""The static-shape decode step (zlocal.inference.decode_step): eager and compiled on the CPU it gives
the HF forward's logits and greedy tokens; on a GPU its captured graph gives the eager step's."""

from __future__ import annotations

import pytest
import torch

from tests.test_engine import hf_greedy, reference_model
from zlocal.errors import ContextOverflowError
from zlocal.inference.decode_step import (
    DecodeStep,
    _runs,
    crossings,
    for_engine,
    graph_safe,
    sample_on_device,
    step_unsupported,
)
from zlocal.inference.kvcache import KVCache

PROMPT = list(range(100, 130))  # 30 tokens; 30 + 30 decoded crosses the fixture's 48-token window


@pytest.fixture(scope="module")
def hf_ref(tiny_zephyr):
    return reference_model(tiny_zephyr)


def _step(path, ctx=128, **kw):
    model = reference_model(path)  # its own copy: preparing fuses its weights
    cache = KVCache(model.config.num_hidden_layers, ctx)
    return model, cache, DecodeStep(model, cache, ctx, **kw)


def _full_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


def test_prefill_and_decode_match_the_hf_forward_beyond_the_window(tiny_zephyr, hf_ref):
    want = hf_greedy(hf_ref, PROMPT, 30)
    _, cache, step = _step(tiny_zephyr, min_span=16)  # spans of 32, then 64 cache positions
    assert step_unsupported(hf_ref) is None and not step.graph and step.crossings == 0
    assert [step.span(e) for e in (1, 16, 17, 33, 64, 65, 500)] == [16, 16, 32, 64, 64, 128, 128]
    logits = step(PROMPT[:17])  # prefill in two chunks, then one token at a time
    logits = step(PROMPT[17:])
    ref = _full_logits(hf_ref, PROMPT + want)
    got, rows = [], []
    for _ in range(30):
        rows.append(logits)
        got.append(int(torch.argmax(logits)))
        logits = step([got[-1]])
    assert got == want and cache.length == len(PROMPT) + 30
    expected = ref[len(PROMPT) - 1 : len(PROMPT) + 29]
    torch.testing.assert_close(torch.stack(rows), expected, rtol=1e-4, atol=1e-4)


def test_compiled_step_matches_eager(tiny_zephyr):
    _, _, eager = _step(tiny_zephyr)
    _, _, compiled = _step(tiny_zephyr, compile_backend="aot_eager")
    first = [int(torch.argmax(eager(PROMPT)))]
    assert int(torch.argmax(compiled(PROMPT))) == first[0]
    tokens_eager = eager.decode(first[0], 12)
    tokens_compiled = compiled.decode(first[0], 12)
    assert tokens_eager == tokens_compiled and len(tokens_eager) == 12
    torch.testing.assert_close(compiled([5]), eager([5]), rtol=1e-5, atol=1e-5)


def test_decode_loop_stops_and_overflows(tiny_zephyr):
    _, cache, step = _step(tiny_zephyr, ctx=40)
    first = int(torch.argmax(step(PROMPT)))
    out = step.decode(first, 5)
    assert len(out) == 5 and cache.length == len(PROMPT) + 5
    cache.truncate(len(PROMPT))
    assert step.decode(first, 5, stop_ids=frozenset({out[1]}))[-1] == out[1]
    with pytest.raises(ContextOverflowError):
        step.decode(first, 20)


def test_sample_on_device():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5])
    assert sample_on_device(logits).tolist() == [1]
    assert sample_on_device(logits, temperature=1.0, top_k=1).tolist() == [1]
    gen = torch.Generator().manual_seed(3)
    draws = {int(sample_on_device(logits, 1.0, 2, gen)) for _ in range(200)}
    assert draws == {1, 3}  # only the top 2, and both of them
    a = [int(sample_on_device(logits, 0.8, 0, torch.Generator().manual_seed(7))) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same draw


def test_crossings_count_boundaries_not_ops():
    assert crossings(["cpu", "cuda:0", "cuda:0", "cuda:0", "cpu", "cpu", "cuda:0"]) == 3
    assert crossings(["cuda:0"] * 5) == 0
    runs = [(d, lo, len(items)) for d, lo, items in _runs(["cuda", "cuda", "cpu", "cpu", "cpu"])]
    assert runs == [("cuda", 0, 2), ("cpu", 2, 3)]


def test_split_path_matches_the_step(tiny_zephyr):
    """The split model's one-token path (device runs in turn; on a GPU each run is a captured graph)
    gives the plain step's tokens; here every run is on the CPU, so it runs eager."""
    _, _, plain = _step(tiny_zephyr, min_span=16)
    _, _, split = _step(tiny_zephyr, min_span=16)
    split.segment_graphs = True
    assert split.segments == [(torch.device("cpu"), 0, 2)]
    first = int(torch.argmax(plain(PROMPT)))
    split(PROMPT)
    assert split.decode(first, 25) == plain.decode(first, 25)


def test_graph_only_for_pytorchs_own_kernels(tiny_zephyr):
    from zlocal.inference.prepare import ConcatLinear

    class Linear4bit(torch.nn.Linear):  # stands in for bitsandbytes' module
        pass

    Linear4bit.__module__ = "bitsandbytes.nn.modules"
    plain, bnb = torch.nn.Linear(4, 4), Linear4bit(4, 4)
    assert graph_safe(plain) and not graph_safe(bnb)
    assert graph_safe(ConcatLinear([plain, plain])) and not graph_safe(ConcatLinear([plain, bnb]))
    model, cache, _ = _step(tiny_zephyr)
    assert for_engine(model, cache, 128) is None  # no layer on a CUDA device: the CPU paths stay


@pytest.mark.gpu
def test_captured_graph_matches_eager_on_cuda(tiny_zephyr):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")

    def build(graph):
        model = reference_model(tiny_zephyr, dtype=torch.bfloat16).cuda()
        cache = KVCache(model.config.num_hidden_layers, 128)
        return DecodeStep(model, cache, 128, graph=graph, min_span=16), model, cache

    eager, _, _ = build(False)
    graphed, model, cache = build(None)
    assert graphed.graph and for_engine(model, cache, 128) is not None
    first = int(torch.argmax(eager(PROMPT)))
    assert int(torch.argmax(graphed(PROMPT))) == first
    assert graphed.decode(first, 30) == eager.decode(first, 30)
    assert sorted(graphed._graphs) == [32, 64]  # one graph per span the decode passed through


def test_engine_hook_runs_the_step_for_one_token_steps(tiny_zephyr, hf_ref, monkeypatch):
    """What the engine does on CUDA, run on the CPU: prompts through the lean forward, one-token steps
    through the decode step (forced here), greedy tokens as the HF forward's."""
    import zlocal
    from zlocal.inference.engine import Engine

    rt = zlocal.load(str(tiny_zephyr), plan=None, dtype="float32", max_context=128)
    engine = rt.engine
    assert engine.step is None  # CPU models keep their paths
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the hook looks, finds no CUDA layer
    assert Engine(rt.model, rt.tokenizer, 128).step is None
    monkeypatch.undo()
    calls = []
    step = DecodeStep(rt.model, engine.cache, 128)
    engine.step = lambda ids: calls.append(len(ids)) or step(ids)
    with engine.without_stop_tokens():
        got = rt.generate(PROMPT, temperature=0, max_new_tokens=20).token_ids
    assert got == hf_greedy(hf_ref, PROMPT, 20)
    assert calls == [1] * 19  # every decode step, never the prompt


@pytest.mark.gpu
def test_split_step_crosses_once_per_boundary(tiny_zephyr, hf_ref):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import dataclasses

    import zlocal
    from tests.test_cpu_quant import auto_plan

    plan = dataclasses.replace(auto_plan(tiny_zephyr), gpu_layers=1, cpu_layers=1, gpu_format="fp32",
                               cpu_format="fp32", gpu_device="cuda:0", compute_dtype="fp32")
    rt = zlocal.load(str(tiny_zephyr), plan=plan, max_context=128)
    step = rt.engine.step
    assert step is not None and not step.graph and step.crossings == 3 and step.segment_graphs
    with rt.engine.without_stop_tokens():
        got = rt.generate(PROMPT, temperature=0, max_new_tokens=20).token_ids
    assert got == hf_greedy(hf_ref, PROMPT, 20)
    assert [k[0] for k in step._graphs] == [0]  # layer 0's GPU run, captured (one span of 128)
