"""The weight-format registry: one object per format, as the planner and memory estimate see it."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import zlocal
from zlocal.errors import InvalidArgumentError, PlanError
from zlocal.formats import (
    FORMATS,
    checkpoint_format,
    convert_format,
    convert_methods,
    cpu_format_beside,
    dense_format,
    formats_for_checkpoint,
    formats_on_load,
    get_format,
    quantization_config_for,
    source_format,
)


def test_names_and_dtype_aliases():
    assert get_format("bfloat16") is get_format("bf16") is dense_format("bf16")
    assert [f.name for f in FORMATS.values() if f.dense] == ["fp32", "bf16", "fp16"]
    with pytest.raises(PlanError, match="unknown weights format 'q3_k'"):
        get_format("q3_k")
    with pytest.raises(PlanError, match="not a floating-point"):
        dense_format("int8")


@pytest.mark.parametrize(
    ("name", "bits"), [("gptq", 4), ("gptq", 8), ("nf4", 4), ("fp4", 4), ("bnb-int8", 8)]
)
def test_quantization_config_round_trip(name, bits):
    assert source_format(quantization_config_for(name, bits)) == (name, bits)


def test_bytes_per_layer_shape():
    n = 4096 * 4096
    assert get_format("bf16").linear_bytes(4096, 4096, compute_bytes=2, bits=16, group_size=128) == 2 * n
    int4 = get_format("int4")
    assert int4.linear_bytes(4096, 4096, compute_bytes=2, bits=4, group_size=128) == n // 2 + 32 * 4096 * 4
    # groups fall back to a size dividing the input width; rows the int4 layouts cannot pack stay dense
    assert int4.linear_bytes(4096, 96, compute_bytes=2, bits=4, group_size=128) == 4096 * 48 + 3 * 4096 * 4
    assert int4.linear_bytes(1000, 4096, compute_bytes=2, bits=4, group_size=128) == 1000 * 4096 * 2
    assert int4.linear_bytes(4096, 1000, compute_bytes=2, bits=4, group_size=128) == 4096 * 1000 * 2
    gptq = get_format("gptq")
    assert gptq.bits_of(8) == 8 and gptq.bits_of(None) == 4 and get_format("int8").bits_of(4) == 8


def test_what_runs_where():
    none = {"torch_int8_cpu": False, "torch_int4_cpu": False}
    assert formats_on_load({}, "bf16", "cpu") == ["bf16", "int8", "int4"]
    assert formats_on_load(none, "bf16", "cpu") == ["bf16"]
    assert formats_on_load({}, "fp16", "cuda") == ["fp16"]
    assert formats_on_load({"bitsandbytes_cuda": True}, "bf16", "cuda") == ["bf16", "bnb-int8", "nf4"]
    sm80 = {"bitsandbytes_cuda": True, "torch_int4_cuda": True}  # PyTorch's int4 kernel: sm80+
    assert formats_on_load(sm80, "bf16", "cuda") == ["bf16", "int4", "bnb-int8", "nf4"]
    assert get_format("int4").runs_on(sm80, "cuda") and not get_format("int4").runs_on({}, "cuda")
    gptq = {"quant_method": "gptq", "bits": 4}
    assert formats_for_checkpoint({}, gptq, "cpu") == []
    assert formats_for_checkpoint({"gptqmodel_torch": True}, gptq, "cpu") == ["gptq"]
    assert formats_for_checkpoint({"gptqmodel_marlin": True}, gptq, "cuda") == ["gptq"]
    nf4 = quantization_config_for("nf4", 4)
    assert formats_for_checkpoint({}, nf4, "cpu") == ["nf4"] and formats_for_checkpoint({}, nf4, "cuda") == []


def test_step_down_targets():
    assert [cpu_format_beside(g) for g in ("bf16", "bnb-int8", "nf4")] == ["int8", "int8", "int4"]
    chain, f = [], get_format("fp32")
    while f.smaller_on_cpu:
        f = get_format(f.smaller_on_cpu)
        chain.append(f.name)
    assert chain == ["bf16", "int8", "int4"]


def test_cpu_bandwidth_share():
    assert get_format("int4").cpu_share(2, own_kernels=True) == pytest.approx(0.84)
    assert get_format("int4").cpu_share(2) == pytest.approx(0.56)
    assert get_format("int8").cpu_share(16) == 0.9  # capped


_NAMES = {f.name for f in FORMATS.values() if not f.dense} | set(convert_methods())


def _literal_names(node):
    if isinstance(node, ast.Constant) and node.value in _NAMES:
        yield node.value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        for e in node.elts:
            yield from _literal_names(e)


def test_no_format_name_is_compared_outside_the_formats_package():
    """Comparisons with a quantized format's name (or tables keyed by them) belong to the format
    objects; elsewhere code asks the registry."""
    root = Path(zlocal.__file__).parent
    hits = []
    for path in sorted(root.rglob("*.py")):
        if "formats" in path.relative_to(root).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                parts = [node.left, *node.comparators]
            elif isinstance(node, ast.Dict):
                parts = [k for k in node.keys if k is not None]
            else:
                continue
            for name in (n for p in parts for n in _literal_names(p)):
                hits.append(f"{path.relative_to(root)}:{node.lineno} {name!r}")
    assert not hits, "format names compared outside zlocal/formats: " + ", ".join(hits)


def test_cli_choices_come_from_the_registry():
    from zlocal.inference.bench import CPU_FORMATS

    assert list(convert_methods()) == ["nf4", "fp4", "int8", "gptq4", "gptq8"]
    assert convert_format("int8") is get_format("bnb-int8") and convert_format("gptq8") is get_format("gptq")
    assert CPU_FORMATS == ("int8", "int4")
    with pytest.raises(InvalidArgumentError, match="--method must be one of nf4, fp4, int8, gptq4, gptq8"):
        convert_format("q4_k")


def test_checkpoint_format_reads_transformers_config_objects():
    from transformers import GPTQConfig

    qc = GPTQConfig(bits=4, group_size=64).to_dict()  # quant_method is a str enum here
    assert checkpoint_format(qc) is get_format("gptq")
    assert checkpoint_format({"quant_method": "awq"}) is None and checkpoint_format(None) is None
    assert checkpoint_format(quantization_config_for("fp4", 4)) is get_format("fp4")


def test_checkpoint_format_of_incomplete_configs():
    # fields a config may leave null: the defaults of the method, never a crash
    assert checkpoint_format({"quant_method": "gptq", "bits": None}) is get_format("gptq")
    assert source_format({"quant_method": "gptq", "bits": None}) == ("gptq", 4)
    nf4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": None}
    assert checkpoint_format(nf4) is get_format("nf4")
    odd = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "int3"}
    assert checkpoint_format(odd) is None


def test_a_quantized_checkpoint_no_kernel_here_runs_is_refused_with_the_fix():
    from zlocal.planning.hardware import hardware_from_profile, list_profiles
    from zlocal.planning.memory import ModelShape
    from zlocal.planning.plan import make_plan

    shape = ModelShape.from_config(list_profiles("model")["zephyr-7b-beta"]["shape"])
    hw = hardware_from_profile("rtx-3060-12gb")  # no gptqmodel kernels in the profile
    gptq = {"quant_method": "gptq", "bits": 4}
    p = make_plan(hw, shape, source_quant=gptq)
    assert not p.fits and p.reasons == [
        "cannot run here: GPTQ checkpoints need gptqmodel's kernels, missing here: pip install 'zlocal[gptq]'"
    ]
    assert (p.weights_format, p.bits, p.source_format) == ("gptq", 4, "gptq")  # never planned as bf16
    with_cpu_kernel = dataclasses.replace(hw, kernels={**hw.kernels, "gptqmodel_torch": True})
    assert make_plan(with_cpu_kernel, shape, source_quant=gptq).fits
    # bitsandbytes 4-bit checkpoints run on the CPU whatever the GPU has
    nf4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    assert make_plan(hw, shape, source_quant=nf4).fits
    assert get_format("nf4").why_not_on({}, "cuda").startswith("nf4 on the GPU needs bitsandbytes")
    assert get_format("int4").why_not_on({}, "cpu") is None
