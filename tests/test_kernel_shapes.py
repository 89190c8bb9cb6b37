"""Drawn shapes through every CPU kernel path, each case in a child process (``tests.kernel_worker``):
a kernel that crashes fails its case instead of the run, and one that returns garbage fails on the
comparison with a float reference computed from the same codes and scales.

Shapes are drawn on both sides of every constraint: widths that are and are not multiples of
8/16/32/64, head_dim 8-256, 1-8 query heads per K/V head, group sizes 32/64/128, prompt lengths on both
sides of each block-wise threshold, sliding windows shorter than the prompt. ``scripts/sweep_kernels.py``
runs the same cases for longer.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.kernel_worker import KernelWorker
from zlocal.kernels import cpu_kernels, cpu_quant

# prompt lengths around every dispatch threshold: int8 block-wise from 32, int4 from 24/48/96 (zlocal's
# layout by group size) and 256 (torch's)
TOKENS = [1, 2, 7, 23, 24, 25, 31, 32, 33, 47, 48, 49, 95, 96, 97, 255, 256, 257]
WIDTHS = [8, 16, 24, 40, 56, 64, 72, 96, 100, 104, 128, 192, 200, 256, 320, 1000]
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def worker():
    w = KernelWorker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def torch_worker():
    """A child where zlocal's own kernels are off, so every layer takes PyTorch's paths."""
    w = KernelWorker(env={"ZLOCAL_CPU_KERNELS": "0"})
    yield w
    w.close()


@st.composite
def linear_cases(draw):
    bits = draw(st.sampled_from([8, 4]))
    return dict(
        kind="linear",
        bits=bits,
        out=draw(st.sampled_from([4, 12, 16, 24, 48, 64, 100, 128, 256])),
        group=draw(st.sampled_from([32, 64, 128])),
        tokens=draw(st.sampled_from(TOKENS)),
        dtype=draw(st.sampled_from(["bfloat16", "float32"])),
        layout=draw(st.sampled_from(["auto", "torch"])),
        seed=draw(st.integers(0, 1000)),
        **{"in": draw(st.sampled_from(WIDTHS))},
    )


def _torch_runs(case) -> bool:
    n, k = case["out"], case["in"]
    if case["bits"] == 8:
        return cpu_quant.torch_int8_supported(n, k)
    g = cpu_quant.int4_group_size(k, case["group"])
    return g is not None and cpu_quant.torch_int4_supported(n, k, g)


@settings(max_examples=30, **SETTINGS)
@given(case=linear_cases())
def test_quantized_linear_matches_its_float_weights(worker, case):
    if case["layout"] == "torch" and not _torch_runs(case):
        case = {**case, "layout": "auto"}  # asking for a kernel that cannot run the shape is an error
    r = worker.run(case)
    if r["layout"] == "unquantized":
        assert not cpu_quant.can_quantize((case["out"], case["in"]), case["bits"], case["group"])
        return
    tol = 0.02 if case["dtype"] == "bfloat16" else 2e-3  # bf16 output rounding is 0.4% of the largest value
    assert r["err"] <= tol, r
    assert r["weight_err"] <= (0.01 if case["bits"] == 8 else 0.1), r  # the codes fit the weights


@settings(max_examples=20, **SETTINGS)
@given(
    bits=st.sampled_from([8, 4]),
    out=st.sampled_from([16, 32, 48, 64, 128]),
    k=st.sampled_from([16, 32, 48, 64, 96, 128, 160, 192, 256, 320]),
    group=st.sampled_from([32, 64, 128]),
    tokens=st.sampled_from([1, 5, 40]),
    dtype=st.sampled_from(["bfloat16", "float32"]),
)
def test_pytorch_kernels_are_right_wherever_zlocal_uses_them(worker, bits, out, k, group, tokens, dtype):
    # the predicates that send layers to PyTorch's kernels still hold on the installed torch
    case = dict(
        kind="torch_kernel", bits=bits, out=out, group=group, tokens=tokens, dtype=dtype, seed=0, **{"in": k}
    )
    if not _torch_runs(case):
        return
    case["group"] = cpu_quant.int4_group_size(k, group)  # what zlocal quantizes with
    assert worker.run(case)["err"] <= (0.02 if dtype == "bfloat16" else 2e-3)


def test_int8_widths_pytorch_gets_wrong_take_the_dense_layout(worker):
    # K=100 crashed the process and K=8/24/200 returned inf/NaN through _weight_int8pack_mm
    for k in (8, 24, 100, 200):
        r = worker.run(
            dict(
                kind="linear",
                bits=8,
                out=12,
                group=32,
                tokens=3,
                dtype="bfloat16",
                layout="auto",
                seed=1,
                **{"in": k},
            )
        )
        assert r["layout"] == "dense" and r["err"] <= 0.02, (k, r)


@st.composite
def model_cases(draw):
    head_dim = draw(st.sampled_from([8, 16, 24, 32, 48, 64, 80, 128, 256]))
    kv_heads = draw(st.sampled_from([1, 2]))
    prompt = draw(st.sampled_from(TOKENS[2:]))
    window = draw(st.one_of(st.none(), st.integers(4, prompt + 4)))
    return dict(
        kind="model",
        arch=draw(st.sampled_from(["mistral", "llama"])),
        hidden=draw(st.sampled_from([8, 24, 64, 72, 100, 128, 192, 256])),
        inter=draw(st.sampled_from([16, 40, 64, 128, 200, 256])),
        heads=kv_heads * draw(st.sampled_from([1, 2, 4, 8])),
        kv_heads=kv_heads,
        head_dim=head_dim,
        window=window,
        fmt=draw(st.sampled_from(["int8", "int4", "dense"])),
        group=draw(st.sampled_from([32, 64, 128])),
        prompt=prompt,
        steps=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 1000)),
    )


# bf16 activations through two random layers against float32: 0.6-1.2% of the largest logit in the
# drawn cases; garbage (a wrong kernel, inf/NaN, a wrong window) is far above it
MODEL_TOL = 0.05


@settings(max_examples=6, **SETTINGS)
@given(case=model_cases())
def test_drawn_decoders_follow_the_float_model(worker, case):
    r = worker.run(case)
    assert r["err"] <= MODEL_TOL, r


@settings(max_examples=3, **SETTINGS)
@given(case=model_cases())
def test_drawn_decoders_on_pytorch_kernels_follow_the_float_model(torch_worker, case):
    r = torch_worker.run(case)
    assert "zlocal" not in r["layouts"], r
    assert r["err"] <= MODEL_TOL, r


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_decode_kernel_shapes_follow_the_float_model(worker, fmt):
    # aligned shapes, so the one-call decode kernel runs the steps (past a short sliding window)
    if cpu_kernels.kernels() is None:
        pytest.skip(f"needs zlocal's AVX-512 BF16 kernels: {cpu_kernels.kernel_status()}")
    case = dict(
        kind="model",
        arch="mistral",
        hidden=128,
        inter=192,
        heads=8,
        kv_heads=2,
        head_dim=32,
        window=20,
        fmt=fmt,
        group=32,
        prompt=25,
        steps=6,
        seed=3,
    )
    r = worker.run(case)
    assert "decode kernel" in r["path"], r
    assert r["err"] <= MODEL_TOL, r


def test_c_entry_points_reject_what_they_do_not_support(worker):
    # called with null pointers: a missing check would crash the child, not return the error code
    r = worker.run({"kind": "c_arguments"})
    if "skipped" in r:
        pytest.skip(f"needs zlocal's AVX-512 BF16 kernels: {r['skipped']}")
    assert r["codes"] == {name: cpu_kernels.ZL_EBADSHAPE for name in r["codes"]}, r["codes"]
    assert all(r["raised"]), r["raised"]  # the Python wrappers raise before calling C


@settings(max_examples=16, **SETTINGS)
@given(
    out=st.sampled_from([4, 12, 64, 100, 128]),
    k=st.sampled_from([32, 64, 96, 128, 192, 256, 640]),
    block=st.sampled_from([32, 64, 128, 256]),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    nested=st.booleans(),
    tokens=st.sampled_from([1, 5, 33, 80]),
    seed=st.integers(0, 1000),
)
def test_bitsandbytes_4bit_layers_on_the_int4_kernel(worker, out, k, block, quant_type, nested, tokens, seed):
    # bitsandbytes' 4-bit codes read through zlocal's kernel with the format's code table
    case = dict(kind="bnb4", out=out, block=block, quant_type=quant_type, nested=nested, tokens=tokens)
    r = worker.run({**case, "in": k, "seed": seed})
    assert r["swapped"] == (k % block == 0 and cpu_kernels.supports_int4(out, k, block)), r
    assert r["err"] <= 0.02, r  # bf16 output rounding is 0.4% of the largest value
