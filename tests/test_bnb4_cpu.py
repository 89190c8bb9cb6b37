"""bitsandbytes NF4/FP4 layers on zlocal's CPU int4 kernels (zlocal/formats/bnb4_cpu.py): the same
weights as bitsandbytes' own dequantization, and converted checkpoints load onto the kernels."""

from __future__ import annotations

import pytest
import torch

import zlocal
from zlocal.conversion.convert import convert
from zlocal.formats.bnb4_cpu import int4_module, swap_bnb4_for_cpu
from zlocal.kernels import cpu_kernels
from zlocal.kernels.cpu_quant import Int4WeightOnlyLinear, dequantized_weight

bnb = pytest.importorskip("bitsandbytes")
needs_kernels = pytest.mark.skipif(cpu_kernels.kernels() is None, reason=cpu_kernels.kernel_status())


def _bnb_layer(out_f: int, in_f: int, quant_type: str, nested: bool, blocksize: int = 64, bias: bool = False):
    gen = torch.Generator().manual_seed(out_f * 7 + in_f)
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=torch.bfloat16, quant_type=quant_type,
                              compress_statistics=nested)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    layer.weight = bnb.nn.Params4bit(
        w, requires_grad=False, compress_statistics=nested, quant_type=quant_type, blocksize=blocksize
    )
    layer = layer.to("cpu")  # quantizes
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(out_f, generator=gen))
    return layer


@needs_kernels
@pytest.mark.parametrize(
    ("quant_type", "nested", "blocksize", "shape"),
    [("nf4", True, 64, (64, 128)), ("fp4", True, 64, (128, 256)), ("nf4", False, 128, (32, 256)),
     ("nf4", True, 64, (96, 640))],
)
def test_weights_equal_bitsandbytes_dequantization(quant_type, nested, blocksize, shape):
    from bitsandbytes.functional import dequantize_4bit

    layer = _bnb_layer(*shape, quant_type, nested, blocksize, bias=True)
    assert layer.weight.quant_state.nested == nested
    new = int4_module(layer, torch.bfloat16)
    assert isinstance(new, Int4WeightOnlyLinear) and new.codes is not None and new.group_size == blocksize
    want = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    got = dequantized_weight(new)
    # table values and scales are rounded to bf16 once each: well under 1% of each weight
    assert torch.allclose(got, want, rtol=2**-7, atol=1e-6), (got - want).abs().max()

    gen = torch.Generator().manual_seed(1)
    for tokens in (1, 5, 80):  # decode, the tile path for a few tokens, the block-wise prompt path
        x = torch.randn(tokens, shape[1], generator=gen).to(torch.bfloat16)
        ref = x.float() @ want.t() + layer.bias.float()
        out = new(x).float()
        assert (out - ref).abs().max() <= 0.02 * ref.abs().max(), tokens


@needs_kernels
def test_swap_skips_layers_outside_the_kernel_layout():
    model = torch.nn.Sequential(_bnb_layer(64, 128, "nf4", True), _bnb_layer(64, 96, "nf4", True))
    swapped, why = swap_bnb4_for_cpu(model, torch.bfloat16)
    assert swapped == 1 and "straddle" in why
    assert isinstance(model[0], Int4WeightOnlyLinear) and type(model[1]).__name__ == "Linear4bit"
    swapped, why = swap_bnb4_for_cpu(model, torch.float32)
    assert swapped == 0 and "needs bf16" in why
    # a weight bitsandbytes repacked for its own CPU kernel is left to it
    repacked = torch.nn.Sequential(_bnb_layer(64, 128, "nf4", True))
    repacked[0].weight.quant_state.packing_format_for_cpu = True
    swapped, why = swap_bnb4_for_cpu(repacked, torch.bfloat16)
    assert swapped == 0 and "repacked" in why


@needs_kernels
@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_converted_checkpoint_runs_on_the_int4_kernel(tiny_zephyr, tmp_path, method):
    from transformers import AutoModelForCausalLM

    out = tmp_path / method
    convert(tiny_zephyr, out, method, evaluate=False, quiet=True)
    rt = zlocal.load(str(out), dtype="bfloat16", max_context=128)
    mods = [m for m in rt.model.modules() if isinstance(m, Int4WeightOnlyLinear)]
    assert len(mods) == 14 and all(m.codes is not None for m in mods)  # 7 projections x 2 layers
    assert not any(type(m).__name__ == "Linear4bit" for m in rt.model.modules())
    assert any(f"{method} layers (14) run on zlocal's CPU int4 kernel" in r for r in rt.plan.reasons)

    # Reference: the untouched checkpoint through transformers and bitsandbytes' own CPU kernels.
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map="cpu")
    ids = rt.encode("Hello world, how are you? The weather is fine today.")
    with torch.inference_mode():
        theirs = ref(input_ids=torch.tensor([ids])).logits[0, -1].float()
    ours = rt.engine.prefill(ids).float()
    assert (ours - theirs).abs().max() <= 0.05 * theirs.abs().max()
    # decode runs on the one-call decode kernel and follows transformers + bitsandbytes token by token
    assert rt.engine.fast is not None and rt.engine.fast.stack_reason is None
    got = [r.token for r in rt.stream_tokens(ids, temperature=0, max_new_tokens=6) if r.token is not None]
    with torch.inference_mode():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :].tolist()
    assert got and got == want[: len(got)]
