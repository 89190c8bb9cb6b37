"""Fast CPU weight-only kernels: exact against dequantized references, close to the float model,
and what the loader uses for CPU layers of a quantizing plan (never bitsandbytes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import zlocal
from zlocal.kernels import cpu_kernels, cpu_prompt, cpu_quant
from zlocal.kernels.cpu_quant import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    can_quantize,
    int4_group_size,
    quantize_int4,
    quantize_int8,
    quantize_linear,
)
from zlocal.kernels.cpu_quant_handler import WeightOnlyQuantHandler, quantized_bytes
from zlocal.planning.memory import ModelShape, estimate


def _dequant_int8(q, scales):
    return q.float() * scales[:, None]


_dequant_int4 = cpu_kernels.dequantize_int4  # (q - 8) * scale + zero per group


def test_quantizers_round_trip_within_half_a_step():
    w = torch.randn(64, 256)
    q, s = quantize_int8(w)
    assert (w - _dequant_int8(q, s)).abs().max() <= s.max() / 2 + 1e-6
    q4, sz = quantize_int4(w, 64)
    assert q4.min() >= 0 and q4.max() <= 15
    step = sz[..., 0].max()
    assert (w - _dequant_int4(q4, sz, 64)).abs().max() <= step / 2 + 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_matches_dequantized_reference(bits, dtype, tol):
    w, b = torch.randn(48, 128), torch.randn(48)
    x = torch.randn(2, 3, 128)
    m = quantize_linear(w, b, bits, dtype, group_size=64)
    assert isinstance(m, Int8WeightOnlyLinear if bits == 8 else Int4WeightOnlyLinear)
    if bits == 8:
        q, s = quantize_int8(w)
        deq = _dequant_int8(q, s)
    else:
        q, sz = quantize_int4(w, 64)
        deq = _dequant_int4(q, sz, 64)
    ref = nn.functional.linear(x.to(dtype).float(), deq.to(dtype).float(), b.to(dtype).float())
    y = m(x)
    assert y.shape == (2, 3, 48) and y.dtype == x.dtype
    assert (y - ref).abs().max() / ref.abs().max() < tol


@pytest.mark.parametrize("bits,rel", [(8, 0.01), (4, 0.15)])
def test_kernel_close_to_float_linear(bits, rel):
    lin = nn.Linear(256, 128, bias=False)
    x = torch.randn(4, 256)
    q = quantize_linear(lin.weight, None, bits, torch.float32)
    ref = lin(x)
    assert ((q(x) - ref).norm() / ref.norm()).item() < rel


@pytest.mark.parametrize("out_f", [300, 64])
def test_blockwise_int8_prefill_matches_the_kernel(out_f, kernel_layout, monkeypatch):
    from zlocal.kernels import cpu_kernels, cpu_quant

    # a scratch of 128 rows: several blocks and a partial last one
    monkeypatch.setattr(cpu_prompt, "_SCRATCH_ELEMS", 128 * 256)
    torch.manual_seed(0)
    m = quantize_linear(torch.randn(out_f, 256) * 0.05, None, 8, torch.bfloat16)
    assert m.layout == kernel_layout
    x = torch.randn(40, 256).to(torch.bfloat16)
    ours = kernel_layout == "zlocal"
    codes = torch.empty_like(m.weight)
    if ours:
        cpu_kernels.unpack_int8(codes, m.weight)
    else:
        codes = m.weight
    exact = x.float() @ _dequant_int8(codes, m.scales.float()).t()
    y = cpu_quant.int8_matmul_blockwise(x, m.weight, m.scales, ours)
    if ours:
        kernel = cpu_kernels.kernels().int8_mm(x, m.weight, m.scales)
    else:
        kernel = torch._weight_int8pack_mm(x, m.weight, m.scales)
    assert y.shape == kernel.shape == (40, out_f) and y.dtype == torch.bfloat16
    # the codes are exact in bf16; only the rounding of the sums and of the scaling differs
    assert ((y.float() - exact).norm() / exact.norm()).item() < 4e-3
    assert ((y.float() - kernel.float()).abs() <= 2 * kernel.float().abs() * 2**-8 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [31, 32])
def test_int8_module_takes_the_blockwise_path_for_bf16_prompts(dtype, tokens, monkeypatch):
    from zlocal.kernels import cpu_quant

    calls = []
    real = cpu_quant.int8_matmul_blockwise
    monkeypatch.setattr(cpu_prompt, "_BF16_GEMM", True)  # whatever this CPU is
    monkeypatch.setattr(cpu_quant, "int8_matmul_blockwise", lambda *a: calls.append(1) or real(*a))
    m = quantize_linear(torch.randn(96, 128), None, 8, dtype)
    y = m(torch.randn(1, tokens, 128).to(dtype))
    assert y.shape == (1, tokens, 96)
    assert bool(calls) == (dtype == torch.bfloat16 and tokens >= cpu_quant.DEQUANT_GEMM_MIN_TOKENS)


@pytest.mark.parametrize("out_f", [320, 64])
def test_blockwise_int4_prefill_matches_the_dequantized_weights(out_f, kernel_layout, monkeypatch):
    from zlocal.kernels import cpu_kernels, cpu_quant

    block = cpu_quant.int4_pack_block()
    assert block in (64, 32)  # torch's CPU int4 layout was read back from known codes
    monkeypatch.setattr(cpu_prompt, "_SCRATCH_ELEMS", 128 * 256)  # several blocks, a partial last one
    torch.manual_seed(0)
    w = torch.randn(out_f, 256) * 0.05
    m = quantize_linear(w, None, 4, torch.bfloat16, group_size=64)
    assert m.layout == kernel_layout
    q, sz = quantize_int4(w, 64)
    deq = _dequant_int4(q, sz.to(torch.bfloat16).float(), 64)
    x = torch.randn(40, 256).to(torch.bfloat16)
    exact = x.float() @ deq.t()
    if kernel_layout == "zlocal":
        y = cpu_quant.int4_matmul_blockwise(x, m.weight, m.scales_and_zeros, 64, None)
        kernel = cpu_kernels.kernels().int4_mm(x, m.weight, m.scales_and_zeros, 64)
    else:
        y = cpu_quant.int4_matmul_blockwise(x, m.weight, m.scales_and_zeros, 64, block)
        kernel = torch._weight_int4pack_mm_for_cpu(x, m.weight, 64, m.scales_and_zeros)
    assert y.shape == kernel.shape == (40, out_f)
    err = ((y.float() - exact).norm() / exact.norm()).item()
    kernel_err = ((kernel.float() - exact).norm() / exact.norm()).item()
    assert err < 6e-3 and kernel_err < 6e-3  # bf16 rounding of the weights and sums, both ways


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [47, 48, 255, 256])
def test_int4_module_takes_the_blockwise_path_for_long_bf16_prompts(
    dtype, tokens, kernel_layout, monkeypatch
):
    from zlocal.kernels import cpu_quant

    calls = []
    real = cpu_quant.int4_matmul_blockwise
    monkeypatch.setattr(cpu_prompt, "_BF16_GEMM", True)
    monkeypatch.setattr(cpu_quant, "int4_matmul_blockwise", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(64, 128)
    m = quantize_linear(w, None, 4, dtype, group_size=64)
    assert m.layout == (kernel_layout if dtype == torch.bfloat16 else "torch")
    x = torch.randn(1, tokens, 128).to(dtype)
    y = m(x)
    assert y.shape == (1, tokens, 64)
    threshold = cpu_quant.int4_blockwise_min_tokens(m.layout, 64)
    assert threshold == (48 if m.layout == "zlocal" else 256)
    assert bool(calls) == (dtype == torch.bfloat16 and tokens >= threshold)
    q, sz = quantize_int4(w, 64)
    ref = x.reshape(tokens, 128).float() @ _dequant_int4(q, sz.to(dtype).float(), 64).t()
    assert ((y.reshape(tokens, 64).float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


def test_blockwise_scratch_works_in_and_outside_inference_mode(monkeypatch):
    from zlocal.kernels import cpu_quant

    monkeypatch.setattr(cpu_prompt, "_scratch", __import__("threading").local())  # a fresh scratch
    m = quantize_linear(torch.randn(64, 128), None, 8, torch.bfloat16, layout="torch")
    x = torch.randn(40, 128).to(torch.bfloat16)
    with torch.inference_mode():  # the engine creates the scratch here...
        first = cpu_quant.int8_matmul_blockwise(x, m.weight, m.scales)
    with torch.no_grad():  # ...and an evaluation may reuse it here
        assert torch.equal(cpu_quant.int8_matmul_blockwise(x, m.weight, m.scales), first)


def test_blockwise_scratch_is_per_thread(monkeypatch):
    import threading

    from zlocal.kernels import cpu_quant

    monkeypatch.setattr(cpu_prompt, "_SCRATCH_ELEMS", 64 * 512)
    torch.manual_seed(0)
    mods = [quantize_linear(torch.randn(512, 512), None, 8, torch.bfloat16, layout="torch") for _ in range(2)]
    xs = [torch.randn(64, 512).to(torch.bfloat16) for _ in range(2)]
    want = [cpu_quant.int8_matmul_blockwise(x, m.weight, m.scales) for m, x in zip(mods, xs, strict=True)]
    got: dict[int, list] = {0: [], 1: []}

    def work(i):
        for _ in range(20):
            got[i].append(cpu_quant.int8_matmul_blockwise(xs[i], mods[i].weight, mods[i].scales))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(y, want[i]) for i in range(2) for y in got[i])


def test_kernel_constraints():
    assert can_quantize((48, 100), 8)
    assert not can_quantize((40, 128), 4)  # out_features must be a multiple of 16
    assert not can_quantize((48, 100), 4)  # no group size divides 100
    assert int4_group_size(576) == 64 and int4_group_size(4096) == 128 and int4_group_size(96) == 32


def _tiny_block():
    torch.manual_seed(0)
    m = nn.Module()
    m.layers = nn.ModuleList(
        [nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 40), nn.Linear(40, 64), nn.Linear(64, 64))]
    )
    m.lm_head = nn.Linear(64, 32)
    return m


def test_handler_two_phases_equal_one_shot():
    a, b = _tiny_block(), _tiny_block()
    x = torch.randn(3, 64)
    h = WeightOnlyQuantHandler(a, bits=4, dtype=torch.float32)
    # 40 rows or 40 inputs: the int4 kernel refuses them; lm_head stays dense
    assert sorted(h.targets()) == ["layers.0.0", "layers.0.3"]
    state = h.quantize()
    h.convert()
    a.load_state_dict(state, strict=False, assign=True)
    assert WeightOnlyQuantHandler(b, bits=4, dtype=torch.float32).apply() == 2
    assert isinstance(a.layers[0][1], nn.Linear) and isinstance(a.lm_head, nn.Linear)
    ya = a.lm_head(a.layers[0](x))
    yb = b.lm_head(b.layers[0](x))
    assert torch.equal(ya, yb)


# -- whole models through zlocal.load -----------------------------------------------------------


def auto_plan(path, dtype: str = "float32", ctx: int = 512):
    """The plan zlocal.load(path, dtype=dtype, max_context=ctx) makes on this machine."""
    from zlocal.checkpoint.resolve import resolve_model
    from zlocal.inference.loader import load_config, plan_for

    resolved = resolve_model(str(path))
    return plan_for(resolved, load_config(resolved), plan="auto", dtype=dtype, max_context=ctx)


def _plan(base, fmt: str, dtype: str = "bf16"):
    # every layer on the CPU in fmt; the rest (bits, head, quantize-on-load) follows from it
    return dataclasses.replace(base, cpu_format=fmt, compute_dtype=dtype, reasons=["test"])


@pytest.fixture(scope="module")
def smollm2_int8(smollm2):
    # int8 layers and an int8 output layer, as the planner picks for a CPU-only int8 plan
    return zlocal.load(str(smollm2), plan=_plan(auto_plan(smollm2, ctx=2048), "int8", "bf16"))


@pytest.fixture(scope="module")
def smollm2_int4(smollm2):
    plan = dataclasses.replace(_plan(auto_plan(smollm2, ctx=2048), "int4", "bf16"), group_size=32)
    return zlocal.load(str(smollm2), plan=plan)


def _logits(rt, text: str) -> torch.Tensor:
    ids = torch.tensor([rt.encode(text)])
    with torch.inference_mode():
        return rt.model(input_ids=ids, use_cache=False).logits[0].float()


PROSE = "The quick brown fox jumps over the lazy dog. Paris is the capital of"


def _modules(rt):
    return {type(m).__module__.split(".")[0] for m in rt.model.modules()}


@pytest.mark.parametrize("name,max_rel,min_top1", [("smollm2_int8", 0.08, 0.9), ("smollm2_int4", 0.1, 0.9)])
def test_quantized_smollm2_close_to_reference(request, smollm2_runtime, name, max_rel, min_top1):
    rt = request.getfixturevalue(name)
    ref, out = _logits(smollm2_runtime, PROSE), _logits(rt, PROSE)
    rel = ((out - ref).norm() / ref.norm()).item()
    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{name}: relative logit error {rel:.3f}, same top-1 {top1:.0%}")
    assert rel < max_rel and top1 >= min_top1
    assert "bitsandbytes" not in _modules(rt)
    kinds = {type(m).__name__ for m in rt.model.model.layers.modules()}
    assert kinds & {"Int8WeightOnlyLinear", "Int4WeightOnlyLinear"} and "Linear" not in kinds
    assert rt.plan.quantize_on_load and rt.info.device == "cpu"


def test_int8_greedy_generation_matches_reference(smollm2_runtime, smollm2_int8):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ref = smollm2_runtime.chat_completion(msgs, temperature=0, max_new_tokens=6)
    out = smollm2_int8.chat_completion(msgs, temperature=0, max_new_tokens=6)
    assert out.token_ids[:4] == ref.token_ids[:4]
    assert "Paris" in out.text


def test_int8_bf16_prompt_path_same_tokens_on_both_forwards(smollm2_int8):
    # prompts of 32+ tokens take the block-wise GEMM in both the lean and the HF forward
    rt = smollm2_int8
    ids = rt.encode_chat([{"role": "user", "content": PROSE + " " + PROSE}])
    assert len(ids) >= 32 and rt.model.dtype == torch.bfloat16
    e = rt.engine
    out = {}
    for fast in (True, False):
        saved, e.fast = e.fast, (e.fast if fast else None)
        try:
            e.reset()
            with e.without_stop_tokens():
                out[fast] = rt.generate(ids, temperature=0, max_new_tokens=12).token_ids
        finally:
            e.fast = saved
    assert out[True] == out[False]


def test_quantized_memory_estimate(smollm2_int4):
    rt = smollm2_int4
    rt.generate("Hi", max_new_tokens=1, temperature=0)
    measured = quantized_bytes(rt.model) + rt.engine.cache.nbytes()
    est = estimate(
        ModelShape.from_config(rt.model.config),
        ctx=rt.max_context,
        cpu_format="int4",
        compute_bytes=2,
        kv_bytes=2,
        group_size=rt.plan.group_size,
        head_format=rt.plan.head_format,
        include_overheads=False,
    ).ram_bytes
    print(f"smollm2 int4: estimated {est} measured {measured} ({est / measured - 1:+.2%})")
    assert est == pytest.approx(measured, rel=0.10)
    dense = estimate(
        ModelShape.from_config(rt.model.config),
        ctx=rt.max_context,
        cpu_format="bf16",
        compute_bytes=2,
        kv_bytes=2,
        include_overheads=False,
    ).cpu_weights
    assert quantized_bytes(rt.model) < 0.6 * dense


def test_int8_head_is_a_separate_copy_and_estimated(smollm2_runtime, smollm2_int8):
    rt = smollm2_int8
    assert rt.model.config.tie_word_embeddings  # SmolLM2 ties lm_head to the embeddings
    head, emb = rt.model.lm_head, rt.model.get_input_embeddings().weight
    assert type(head) is Int8WeightOnlyLinear and head.weight.shape == emb.shape
    # the lookup still reads the dense table, unchanged
    assert torch.equal(emb, smollm2_runtime.model.get_input_embeddings().weight)
    measured = quantized_bytes(rt.model) + rt.engine.cache.nbytes()
    shape = ModelShape.from_config(rt.model.config)
    kw = dict(ctx=rt.max_context, cpu_format="int8", compute_bytes=2, kv_bytes=2, include_overheads=False)
    est = estimate(shape, head_format="int8", **kw).ram_bytes
    assert est == pytest.approx(measured, rel=0.10)
    # the int8 copy (codes and a scale per row) takes the place of the packed bf16 copy
    int8_copy = shape.vocab_size * (shape.hidden_size + 2)
    bf16_copy = shape.vocab_size * shape.hidden_size * 2
    assert est - estimate(shape, **kw).ram_bytes == int8_copy - bf16_copy


def test_streamed_load_equals_two_phase_handler(tiny_zephyr):
    streamed = zlocal.load(str(tiny_zephyr), plan=_plan(auto_plan(tiny_zephyr), "int4", "fp32"))
    from zlocal.checkpoint.resolve import resolve_model
    from zlocal.inference.loader import load_model, quantize_head_int8

    dense = load_model(resolve_model(str(tiny_zephyr)), dtype="float32", device="cpu").model
    WeightOnlyQuantHandler(dense, bits=4, dtype=torch.float32, group_size=streamed.plan.group_size).apply()
    assert streamed.plan.head_format == "int8"  # as the planner derives it for all-CPU int4
    quantize_head_int8(dense, torch.float32)
    assert torch.equal(_logits(streamed, PROSE), _logits_model(dense, streamed.encode(PROSE)))


def _logits_model(model, ids):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_nf4_with_cpu_int4_split(tiny_zephyr, tiny_runtime):
    plan = dataclasses.replace(
        auto_plan(tiny_zephyr),
        gpu_format="nf4",
        cpu_format="int4",
        gpu_layers=1,
        cpu_layers=1,
        compute_dtype="bf16",
        gpu_device="cuda:0",
        reasons=[],
    )
    rt = zlocal.load(str(tiny_zephyr), plan=plan)
    assert rt.model.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    assert type(rt.model.model.layers[1].mlp.down_proj).__name__ == "Int4WeightOnlyLinear"
    ref, out = _logits(tiny_runtime, PROSE), _logits(rt, PROSE).cpu()
    assert ((out - ref).norm() / ref.norm()).item() < 0.5
    assert rt.chat([{"role": "user", "content": "hi"}], temperature=0, max_new_tokens=4) is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantizing_in_row_blocks_matches_one_pass_and_leaves_the_input(monkeypatch, dtype):
    # on-load quantization works through a few rows at a time to bound its float32 temporaries
    w = torch.randn(300, 128).to(dtype)
    before = w.clone()
    whole = quantize_int8(w), quantize_int4(w, 32)
    monkeypatch.setattr(cpu_quant, "_QUANT_BLOCK_ELEMS", 1000)  # 7 rows per block, a ragged last one
    blocks = quantize_int8(w), quantize_int4(w, 32)
    for a, b in zip(whole, blocks, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(w, before)
    w32 = w.float()
    q, _ = quantize_int8(w32)
    ref = torch.round(w32 / (w32.abs().amax(dim=1) / 127.0)[:, None]).clamp(-128, 127)
    assert torch.equal(q.float(), ref) and torch.equal(w32, before.float())
