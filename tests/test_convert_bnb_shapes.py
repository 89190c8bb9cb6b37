"""bitsandbytes outputs must load on the CPU in plain transformers, or be refused before any work.

bitsandbytes 0.50.2 repacks 4-bit weights for its AVX-512 BF16 CPU kernel on the first forward and
that needs out_features % 32 == 0 and in_features % 64 == 0 (zlocal.conversion.quantize_bnb.cpu_loadable);
int8 has no such step.
"""

from __future__ import annotations

import pytest
import torch

from tests.fixtures import build_tiny_mistral
from zlocal.checkpoint.manifest import verify
from zlocal.conversion.convert import convert
from zlocal.conversion.quantize_bnb import cpu_loadable, quantize_tensor
from zlocal.errors import ConversionError


def _tiny(tmp_path_factory, name: str, **overrides):
    dest = tmp_path_factory.mktemp(name) / "src"
    build_tiny_mistral(dest, num_hidden_layers=1, **overrides)
    return dest


def _runs_on_cpu(out):
    """Load OUT in plain transformers on the CPU and run a prompt (batched) and a decode step."""
    from transformers import AutoModelForCausalLM

    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=dtype)
        with torch.no_grad():
            model(torch.tensor([[1, 22557, 736], [1, 910, 28725]]))
        toks = model.generate(torch.tensor([[1, 22557, 736]]), max_new_tokens=2, do_sample=False)
        assert toks.shape == (1, 5)


def test_predicate():
    assert cpu_loadable("nf4", 64, 64) and cpu_loadable("fp4", 192, 576)
    assert not cpu_loadable("nf4", 64, 96)  # the input features
    assert not cpu_loadable("fp4", 48, 64)  # rows not in tiles of 32
    assert cpu_loadable("int8", 48, 100)


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_unusual_shape_that_fits_converts_and_loads(method, tmp_path_factory):
    """192 is no power of two but a multiple of 64 (in) and 32 (out): it must convert and run."""
    src = _tiny(tmp_path_factory, f"ok-{method}", hidden_size=192, intermediate_size=192)
    out = src.parent / method
    convert(src, out, method, evaluate=False, quiet=True)
    assert verify(out).ok
    _runs_on_cpu(out)


@pytest.mark.parametrize(
    "overrides,layer",
    [
        ({"hidden_size": 96}, r"mlp\.gate_proj\.weight has out_features 128 and in_features 96 \(and 4 more"),
        ({"num_key_value_heads": 1}, r"self_attn\.k_proj\.weight has out_features 16 and in_features 64"),
    ],
)
@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_shape_that_fails_is_refused_before_work(method, overrides, layer, tmp_path_factory):
    src = _tiny(tmp_path_factory, "bad", **overrides)
    root = tmp_path_factory.mktemp("out")
    with pytest.raises(ConversionError, match=rf"{method}: model\.layers\.0\.{layer}.*--method int8"):
        convert(src, root / "o", method, evaluate=False, quiet=True)
    assert list(root.iterdir()) == []  # no OUT and no temp dir


def test_int8_takes_any_shape(tmp_path_factory):
    """The same shapes under int8 convert and run (bitsandbytes' int8 CPU path has no tiling)."""
    src = _tiny(tmp_path_factory, "int8", hidden_size=96, num_key_value_heads=1, intermediate_size=100)
    out = src.parent / "int8"
    convert(src, out, "int8", evaluate=False, quiet=True)
    _runs_on_cpu(out)


def test_predicate_is_bitsandbytes_own_rule():
    """On a CPU where bitsandbytes uses its AVX-512 BF16 4-bit kernel, a layer runs exactly when
    the predicate says so; if a bitsandbytes upgrade lifts the limit this fails and says so."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes' repacking CPU kernel needs AVX-512 BF16; other CPUs run any shape")
    name = "model.layers.0.mlp.up_proj.weight"
    for out_f in (32, 48, 64):
        for in_f in (64, 96, 128, 200):
            sd = quantize_tensor(name, torch.randn(out_f, in_f), "nf4", torch.float32)
            layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            stats = {k: v for k, v in sd.items() if k != name}
            layer.weight = bnb.nn.Params4bit.from_prequantized(sd[name], stats, device="cpu", module=layer)
            try:
                with torch.no_grad():
                    layer.eval()(torch.randn(2, in_f))
                ran = True
            except (RuntimeError, AssertionError):
                ran = False
            assert ran == cpu_loadable("nf4", out_f, in_f), (out_f, in_f, ran)
