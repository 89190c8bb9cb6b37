"""The lean forward gives the same tokens as the HF forward it replaces."""

from __future__ import annotations

import pytest
import torch

import zlocal
from tests.test_engine import hf_greedy, reference_model
from zlocal.inference import prepare
from zlocal.inference.engine import DEFAULT_PREFILL_CHUNK, Engine
from zlocal.inference.fastpath import unsupported_reason
from zlocal.inference.sampling import SamplingParams
from zlocal.kernels import cpu_kernels, dense_kernels
from zlocal.kernels.cpu_quant_handler import quantized_bytes
from zlocal.planning.memory import ModelShape, estimate


def _greedy(rt, ids, n, fast):
    e = rt.engine
    saved_fast = e.fast
    e.fast = saved_fast if fast else None
    try:
        e.reset()
        with e.without_stop_tokens():
            return rt.generate(ids, temperature=0, max_new_tokens=n).token_ids
    finally:
        e.fast = saved_fast


@pytest.fixture(scope="module")
def hf_tiny(tiny_zephyr):
    return reference_model(tiny_zephyr)


def _engine_greedy(engine, ids, n):
    params = SamplingParams(temperature=0, max_new_tokens=n)
    with engine.without_stop_tokens():
        return [r.token for r in engine.generate(ids, params) if r.token is not None]


def test_fast_path_is_active_for_llama_and_mistral(tiny_runtime, smollm2_runtime):
    assert tiny_runtime.engine.fast is not None and smollm2_runtime.engine.fast is not None


def test_fast_equals_hf_forward_tiny_beyond_window(tiny_runtime, hf_tiny):
    rt = tiny_runtime
    ids = rt.encode(
        "The lighthouse keeper climbed the spiral stairs every evening, counting the steps aloud, "
        "checking the lamp, the lens and the clockwork that turned them, and writing the weather "
        "into a logbook that nobody but the supply boat captain would ever read."
    )
    assert len(ids) > rt.model.config.sliding_window
    expected = hf_greedy(hf_tiny, ids, 40)
    assert _greedy(rt, ids, 40, fast=True) == expected
    rt.engine.prefill_chunk = 7  # chunked prefill crossing the window inside chunks
    try:
        assert _greedy(rt, ids, 20, fast=True) == expected[:20]
    finally:
        rt.engine.prefill_chunk = DEFAULT_PREFILL_CHUNK


def test_fast_equals_hf_forward_smollm2(smollm2_runtime, smollm2):
    # the reference is loaded apart: zlocal's fusion re-points the weights of the models it runs
    rt = smollm2_runtime
    ids = rt.encode_chat([{"role": "user", "content": "List three uses of copper."}])
    assert _greedy(rt, ids, 40, fast=True) == hf_greedy(reference_model(smollm2), ids, 40)


@pytest.fixture(scope="module")
def smollm2_bf16(smollm2):
    """Dense bf16 SmolLM2 on zlocal's lean forward, and the same checkpoint loaded by transformers."""
    rt = zlocal.load(str(smollm2), plan=None, dtype="bfloat16", max_context=256)
    return rt, reference_model(smollm2, torch.bfloat16)


def test_fast_logits_close_to_hf_in_bf16(smollm2_bf16):
    rt, ref = smollm2_bf16
    ids = rt.encode("Copper is a metal that")
    e = rt.engine
    e.reset()
    fast_logits = e.prefill(ids).float()
    with torch.inference_mode():
        hf_logits = ref(torch.tensor([ids])).logits[0, -1].float()
    assert torch.argmax(fast_logits) == torch.argmax(hf_logits)
    assert torch.nn.functional.cosine_similarity(fast_logits, hf_logits, dim=0) > 0.999


_NO_PACKING = "oneDNN cannot pack bf16 weights bit-identically to F.linear on this CPU (needs AVX-512+)"


def _kernel_cases():
    for dtype in (torch.float32, torch.bfloat16):
        for kernel in ("linear", "mv", "packed"):
            if kernel == "packed" and dtype != torch.bfloat16:
                continue  # only bf16 is packed: only there is it bit-identical to F.linear
            marks = ()
            if kernel == "packed":
                marks = pytest.mark.skipif(not dense_kernels.packing_supported(dtype), reason=_NO_PACKING)
            yield pytest.param(dtype, kernel, marks=marks, id=f"{kernel}-{str(dtype)[6:]}")


@pytest.mark.parametrize("dtype,kernel", list(_kernel_cases()))
@pytest.mark.parametrize("outs,in_f", [((576, 192, 192), 576), ((576,), 1536), ((49152,), 576)])
def test_projection_is_bit_identical_to_linear(dtype, kernel, outs, in_f, monkeypatch):
    # Which kernel runs depends on a timing of this CPU; all must give the same numbers, for one
    # token (the decode kernels) and several, fused and through each HF module.
    monkeypatch.setitem(dense_kernels._KERNEL, dtype, kernel)
    owner = torch.nn.Module()
    names = [f"p{i}" for i in range(len(outs))]
    weights = [torch.randn(o, in_f).to(dtype) for o in outs]
    for name, w in zip(names, weights, strict=True):
        setattr(owner, name, torch.nn.Linear(in_f, w.shape[0], bias=False, dtype=dtype))
        getattr(owner, name).weight.data.copy_(w)
    proj = prepare._projection(owner, names)
    swapped = type(getattr(owner, names[0])) is dense_kernels.PackedLinear
    assert swapped == (kernel == "packed")
    for t in (1, 5):
        x = torch.randn(1, t, in_f).to(dtype)
        want = [torch.nn.functional.linear(x, w) for w in weights]
        y = proj(x)
        assert y.shape == (1, t, sum(outs))
        assert torch.equal(y, torch.cat(want, dim=-1))
        for name, w in zip(names, want, strict=True):
            assert torch.equal(getattr(owner, name)(x), w)


@pytest.mark.skipif(not dense_kernels.packing_supported(torch.bfloat16), reason=_NO_PACKING)
def test_packed_weights_replace_the_dense_ones(smollm2, monkeypatch):
    monkeypatch.setitem(dense_kernels._KERNEL, torch.bfloat16, "packed")
    rt = zlocal.load(str(smollm2), plan=None, dtype="bfloat16", max_context=64)
    attn, mlp = rt.model.model.layers[0].self_attn, rt.model.model.layers[0].mlp
    # q/k/v share one packed weight, gate/up another: memory is not doubled
    assert attn.q_proj.packed is attn.k_proj.packed is attn.v_proj.packed
    assert mlp.gate_proj.packed is mlp.up_proj.packed
    assert not any(type(m) is torch.nn.Linear for m in rt.model.modules())
    # the tied head gets its own packed copy; the embedding lookup keeps the dense table
    assert type(rt.model.lm_head) is dense_kernels.PackedLinear
    emb = rt.model.get_input_embeddings().weight
    assert torch.equal(rt.model.lm_head.packed.to_dense(), emb)
    shape = ModelShape.from_config(rt.model.config)
    rt.generate("Hi", max_new_tokens=1, temperature=0)
    measured = quantized_bytes(rt.model) + rt.engine.cache.nbytes()
    est = estimate(shape, ctx=64, cpu_format="bf16", kv_bytes=2, include_overheads=False).ram_bytes
    assert est == pytest.approx(measured, rel=0.10)


def test_fast_greedy_equals_hf_forward_smollm2_bf16(smollm2_bf16):
    rt, ref = smollm2_bf16
    ids = rt.encode_chat([{"role": "user", "content": "List three uses of copper."}])
    assert _greedy(rt, ids, 24, fast=True) == hf_greedy(ref, ids, 24)


@pytest.mark.parametrize("outs", [(64, 32, 32), (48, 16), (64, 64), (128, 64, 192)])
def test_int4_fusion_only_on_whole_pack_blocks(outs):
    from zlocal.inference.prepare import _fuse_quantized, _projection
    from zlocal.kernels.cpu_quant import quantize_linear

    parts = [quantize_linear(torch.randn(o, 128), None, 4, torch.float32, 32) for o in outs]
    x = torch.randn(1, 3, 128)
    want = torch.cat([p(x) for p in parts], dim=-1)
    assert (_fuse_quantized(parts) is not None) == all(o % 64 == 0 for o in outs)
    owner = torch.nn.Module()
    for i, part in enumerate(parts):
        setattr(owner, f"p{i}", part)
    assert torch.equal(_projection(owner, [f"p{i}" for i in range(len(parts))])(x), want)


def test_the_decoder_is_prepared_once_at_load(smollm2):
    # zlocal.load fuses the decoder once; engines built later on the same model reuse that
    # preparation and leave the HF modules as they are.
    rt = zlocal.load(str(smollm2), plan=None, dtype="bfloat16", max_context=64)
    prepared = prepare.prepare_decoder(rt.model)
    assert rt.engine.fast.layers is prepared.layers
    before = {
        name: (type(m), [t.data_ptr() for t in m.parameters(recurse=False)])
        for name, m in rt.model.named_modules()
    }
    again = Engine(rt.model, rt.tokenizer, 64)
    assert again.fast.layers is prepared.layers
    after = {
        name: (type(m), [t.data_ptr() for t in m.parameters(recurse=False)])
        for name, m in rt.model.named_modules()
    }
    assert after == before


def test_unsupported_models_keep_the_hf_forward(tiny_runtime):
    class Fake:
        config = type("C", (), {"model_type": "gpt2"})()

    assert "architecture" in unsupported_reason(Fake())
    assert unsupported_reason(tiny_runtime.model) is None


@pytest.mark.parametrize("fast", [True, False])
def test_prefix_reuse_same_on_both_paths(tiny_runtime, fast):
    rt = tiny_runtime
    e = rt.engine
    saved = e.fast
    e.fast = saved if fast else None
    a = rt.encode("Hello world, how are you?")
    e.prefill_chunk = len(a)  # ``a`` is one aligned chunk: reusable (test_determinism)
    try:
        rt.generate(a, temperature=0, max_new_tokens=3)
        warm = rt.generate([*a, 28705, 13], temperature=0, max_new_tokens=5).token_ids
        assert e.stats.last_reused == len(a)
        e.reset()
        assert rt.generate([*a, 28705, 13], temperature=0, max_new_tokens=5).token_ids == warm
    finally:
        e.fast = saved
        e.prefill_chunk = DEFAULT_PREFILL_CHUNK


@pytest.mark.parametrize(
    "fmt,dtype", [("int8", "float32"), ("int8", "bfloat16"), ("int4", "float32"), ("int4", "bfloat16")]
)
def test_fused_quantized_projections_match_hf_forward(tiny_zephyr, fmt, dtype):
    from zlocal.inference.bench import cpu_plan
    from zlocal.inference.loader import load_for_runtime
    from zlocal.inference.runtime import load_chat_template
    from zlocal.kernels.cpu_quant import Int4WeightOnlyLinear, Int8WeightOnlyLinear

    plan = cpu_plan(str(tiny_zephyr), fmt, dtype=dtype, max_context=256)
    rt = zlocal.load(str(tiny_zephyr), plan=plan, dtype=dtype, max_context=256)
    kind = Int8WeightOnlyLinear if fmt == "int8" else Int4WeightOnlyLinear
    # the fast path keeps bound forward methods of the (fused) modules
    qkv, _, gate_up, _ = rt.engine.fast.layers[0].projection_modules()
    assert type(gate_up) is kind  # one kernel call for gate/up (128 rows each)
    mlp = rt.model.model.layers[0].mlp
    assert mlp.gate_proj.weight.data_ptr() == gate_up.weight.data_ptr()  # views, not copies
    # k/v have 32 rows: int8 fuses them; int4 only in zlocal's layout (4-row tiles; torch's
    # interleaves blocks of 64 rows). fp32 layers always use torch's kernel.
    zlocal_layout = gate_up.layout == "zlocal"
    assert zlocal_layout == (dtype == "bfloat16" and cpu_kernels.kernels() is not None)
    assert (type(qkv) is kind) == (fmt == "int8" or zlocal_layout)
    # both plans run the output layer on the int8 kernel, on both paths
    assert plan.head_format == "int8" and type(rt.model.lm_head) is Int8WeightOnlyLinear
    assert rt.engine.fast.lm_head.__self__ is rt.model.lm_head
    # The reference: the same plan loaded again, on the HF forward, never prepared for the lean
    # forward (whose fusion re-points the weights of the modules it fuses).
    resolved, config, tokenizer, _ = load_chat_template(str(tiny_zephyr))
    ref_plan = cpu_plan(str(tiny_zephyr), fmt, dtype=dtype, max_context=256)
    loaded = load_for_runtime(resolved, config, plan=ref_plan, dtype=dtype, max_context=256, prepare=False)
    ref_model = loaded.model
    assert prepare._PREPARED.get(ref_model) is None  # its modules hold their own weights
    ref = Engine(ref_model, tokenizer, 256, fast=False)
    ids = rt.encode("The lighthouse keeper climbed the spiral stairs every evening and")
    e = rt.engine
    e.reset()
    assert torch.equal(e.prefill(ids), ref.prefill(ids))
    # one-token steps on the decode kernel are compared with this path in test_decode_stack
    e.fast.stack_reason = "off: this test is about the fused projections"
    assert _greedy(rt, ids, 30, fast=True) == _engine_greedy(ref, ids, 30)
