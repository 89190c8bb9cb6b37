"""Memory estimator: formulas against known Mistral-7B sizes, and estimated vs measured bytes on CPU."""

from __future__ import annotations

import dataclasses

import pytest

import zlocal
from tests.test_cpu_quant import auto_plan
from zlocal.kernels.cpu_quant_handler import quantized_bytes
from zlocal.planning.hardware import list_profiles
from zlocal.planning.memory import MIB, ModelShape, estimate, kv_cache_bytes, kv_tokens, linear_bytes

ZEPHYR = ModelShape.from_config(list_profiles("model")["zephyr-7b-beta"]["shape"])


def _weights(fmt: str) -> int:
    return estimate(ZEPHYR, ctx=4096, cpu_format=fmt, include_overheads=False).cpu_weights


def test_zephyr_weight_sizes_match_published_numbers():
    assert _weights("bf16") == pytest.approx(14.48e9, rel=0.01)  # 7.24 B parameters in 16 bits
    assert _weights("gptq") == pytest.approx(4.16e9, rel=0.03)  # GPTQ 4-bit g128 files
    assert 3.9e9 < _weights("nf4") < 4.4e9 < _weights("int8") < _weights("bf16")
    assert _weights("int4") < _weights("int8") < 7.7e9  # below llama.cpp Q8_0 (8.5 bits/weight)


def test_kv_cache_formula_and_window():
    assert kv_cache_bytes(ZEPHYR, 4096, kv_bytes=2) == 512 * MIB  # 128 KiB per token in fp16
    assert kv_cache_bytes(ZEPHYR, 8192, kv_bytes=1) == kv_cache_bytes(ZEPHYR, 4096, kv_bytes=2)
    assert kv_tokens(ZEPHYR, 32768) == 32768  # zlocal's cache keeps every position
    assert kv_tokens(ZEPHYR, 32768, honor_window=True) == 4096  # a rolling cache would not


def test_quantized_formats_carry_their_statistics():
    n = 4096 * 4096
    assert linear_bytes(4096, 4096, "int8", compute_bytes=2) == n + 4096 * 2
    assert linear_bytes(4096, 4096, "int4", compute_bytes=2) == n // 2 + 32 * 4096 * 4
    gptq8 = linear_bytes(4096, 4096, "gptq", bits=8, group_size=128)
    assert gptq8 > n and gptq8 < linear_bytes(4096, 4096, "bf16")


def test_split_moves_bytes_between_devices():
    whole = estimate(ZEPHYR, ctx=4096, gpu_layers=32, gpu_format="nf4")
    split = estimate(ZEPHYR, ctx=4096, gpu_layers=16, gpu_format="nf4", cpu_format="int4")
    cpu = estimate(ZEPHYR, ctx=4096, gpu_layers=0, cpu_format="int4")
    assert cpu.vram_bytes == 0 and whole.vram_bytes > split.vram_bytes > 0
    assert split.gpu_kv == split.cpu_kv == kv_cache_bytes(ZEPHYR, 4096) // 2


def _measured(rt) -> int:
    if rt.engine.cache.nbytes() == 0:
        rt.generate("Hello", max_new_tokens=1, temperature=0)  # allocates the KV cache
    return quantized_bytes(rt.model) + rt.engine.cache.nbytes()


def _estimated(rt, fmt: str, compute_bytes: int) -> int:
    shape = ModelShape.from_config(rt.model.config)
    est = estimate(
        shape,
        ctx=rt.max_context,
        cpu_format=fmt,
        compute_bytes=compute_bytes,
        kv_bytes=compute_bytes,
        head_format=rt.plan.head_format if rt.plan else None,  # fixtures load without a plan
        include_overheads=False,
    )
    return est.ram_bytes


@pytest.mark.parametrize("name", ["tiny_runtime", "smollm2_runtime"])
def test_estimate_matches_measured_fixture(request, name):
    rt = request.getfixturevalue(name)
    measured = _measured(rt)
    estimated = _estimated(rt, "fp32", 4)
    print(f"{name}: estimated {estimated} measured {measured} ({estimated / measured - 1:+.2%})")
    assert estimated == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("fmt,bits", [("int8", 8), ("int4", 4)])
def test_estimate_matches_measured_quantized(tiny_zephyr, fmt, bits):
    plan = dataclasses.replace(
        auto_plan(tiny_zephyr),
        cpu_format=fmt,
        compute_dtype="bf16",
        reasons=[],
    )
    assert plan.bits == bits
    rt = zlocal.load(str(tiny_zephyr), plan=plan)
    measured, estimated = _measured(rt), _estimated(rt, fmt, 2)
    print(f"tiny {fmt}: estimated {estimated} measured {measured} ({estimated / measured - 1:+.2%})")
    assert estimated == pytest.approx(measured, rel=0.10)
