"""zlocal's own int4 and int8 CPU kernels: their layouts, their results against a float reference,
the fallbacks when they cannot run, and the build cache."""

from __future__ import annotations

import ctypes
import re
import subprocess

import pytest
import torch

from zlocal.kernels import cpu_kernels, cpu_kernels_check, cpu_quant


def _kernel():
    kernel = cpu_kernels.kernels()
    if kernel is None:
        pytest.skip(f"needs zlocal's AVX-512 BF16 kernels: {cpu_kernels.kernel_status()}")
    return kernel


def test_kernel_runs_where_the_cpu_supports_it():
    # the tests below skip without the kernel; this one makes sure a broken build or self-check
    # fails here instead of hiding behind those skips
    missing = [f for f in cpu_kernels.REQUIRED_CPU_FLAGS if f not in cpu_kernels._cpu_flags()]
    if missing or cpu_kernels._compiler() is None or cpu_kernels.platform.system() != "Linux":
        pytest.skip(f"this CPU or system cannot run the kernel (missing: {missing or 'a C compiler'})")
    if cpu_kernels.os.environ.get("ZLOCAL_CPU_KERNELS") == "0":
        pytest.skip("ZLOCAL_CPU_KERNELS=0")
    assert cpu_kernels.kernels() is not None, cpu_kernels.kernel_status()


def test_packing_layout_and_round_trip():
    codes = torch.randint(0, 16, (8, 128))
    packed = cpu_kernels.pack_int4(codes)
    assert packed.shape == (8, 64) and packed.dtype == torch.uint8
    # tile 1 (rows 4..7), chunk 1 (codes 64..127), row 2 of the tile (row 6), byte 5
    byte = packed.reshape(2, 2, 4, 32)[1, 1, 2, 5].item()
    assert byte == codes[6, 64 + 5].item() | codes[6, 64 + 32 + 5].item() << 4
    out = torch.empty_like(codes)
    cpu_kernels.unpack_int4(out, packed)
    assert torch.equal(out, codes)
    sz = torch.randn(128 // 32, 8, 2)  # torch's [K/G, N, 2]
    tiled = cpu_kernels.pack_scales(sz)
    assert tiled.shape == (2, 4, 4, 2) and torch.equal(tiled[1, 3, 2], sz[3, 6])  # row 6, group 3
    assert torch.equal(cpu_kernels.scales_by_row(tiled), sz.transpose(0, 1))


_SHAPES = [
    (4 * 37, 512),  # a tile count that does not split evenly between threads
    (8, 8448),  # long rows: one token takes tiles in pairs
    (12, 576),  # an odd number of groups (SmolLM2's width)
]


@pytest.mark.parametrize(
    "group,n,k", [(g, n, k) for n, k in _SHAPES for g in (32, 64, 128, 256) if k % g == 0]
)
@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_float_reference(group, tokens, threads, n, k):
    kernel = _kernel()
    gen = torch.Generator().manual_seed(group * 100 + tokens)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    sz = (torch.rand(k // group, n, 2, generator=gen) * 0.2 - 0.1).to(torch.bfloat16)
    x = torch.randn(tokens, k, generator=gen).to(torch.bfloat16)
    exact = x.float() @ cpu_kernels.dequantize_int4(codes, sz, group).t()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = kernel.int4_mm(x, cpu_kernels.pack_int4(codes), cpu_kernels.pack_scales(sz), group)
    finally:
        torch.set_num_threads(saved)
    assert y.shape == (tokens, n) and y.dtype == torch.bfloat16
    # products of bf16 values are exact in fp32; what is left is fp32 summation and bf16 rounding
    bound = exact.abs() * 2**-8 + 1e-4 * exact.abs().max()
    assert ((y.float() - exact).abs() <= bound).all()


def test_module_with_zlocal_layout_tracks_torch_kernel():
    _kernel()
    torch.manual_seed(0)
    w = torch.randn(96, 576) * 0.05
    ours = cpu_quant.quantize_linear(w, None, 4, torch.bfloat16, group_size=64)
    theirs = cpu_quant.quantize_linear(w, None, 4, torch.bfloat16, group_size=64, layout="torch")
    assert (ours.layout, theirs.layout) == ("zlocal", "torch")
    assert ours.row_block == 4 and theirs.row_block == 64
    for tokens in (1, 5):
        x = torch.randn(tokens, 576).to(torch.bfloat16)
        a, b = ours(x).float(), theirs(x).float()
        assert ((a - b).norm() / b.norm()).item() < 5e-3


def test_float32_layers_keep_torch_layout():
    m = cpu_quant.quantize_linear(torch.randn(64, 128), None, 4, torch.float32, group_size=64)
    assert m.layout == "torch"
    with pytest.raises(cpu_quant.InvalidArgumentError, match="use 'torch'"):
        cpu_quant.quantize_linear(torch.randn(64, 128), None, 4, torch.float32, 64, layout="zlocal")


def test_shapes_outside_the_layout_use_torch():
    assert cpu_kernels.supports_int4(4096, 14336, 128) and cpu_kernels.supports_int4(192, 576, 32)
    assert not cpu_kernels.supports_int4(4096, 4096 + 32, 32)  # in_features not whole 64-code chunks
    assert not cpu_kernels.supports_int4(4096, 4096, 96)  # group not 32 or a multiple of 64
    assert not cpu_kernels.supports_int4(4098, 4096, 128)  # a partial 4-row tile
    assert cpu_kernels.supports_int8(32000, 4096) and cpu_kernels.supports_int8(192, 576)
    assert not cpu_kernels.supports_int8(4098, 4096) and not cpu_kernels.supports_int8(4096, 4096 + 32)


@pytest.mark.parametrize(
    "setup,reason",
    [
        (lambda mp: mp.setenv("ZLOCAL_CPU_KERNELS", "0"), "disabled by ZLOCAL_CPU_KERNELS=0"),
        (lambda mp: mp.setattr(cpu_kernels, "_cpu_flags", lambda: {"avx2", "avx512f"}), "CPU lacks avx512bw"),
        (lambda mp: mp.setattr(cpu_kernels, "_compiler", lambda: None), "no C compiler"),
    ],
)
def test_falls_back_to_torch_with_a_reason(setup, reason, monkeypatch, tmp_path):
    monkeypatch.setenv("ZLOCAL_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernels.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: set(cpu_kernels.REQUIRED_CPU_FLAGS))
    setup(monkeypatch)
    monkeypatch.setattr(cpu_kernels, "_status", {})
    assert cpu_kernels.kernels.__wrapped__() is None
    assert cpu_kernels._status["cpu"].startswith("PyTorch's kernels: " + reason)


def test_a_failing_compiler_falls_back_and_leaves_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv("ZLOCAL_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: set(cpu_kernels.REQUIRED_CPU_FLAGS))
    monkeypatch.setattr(cpu_kernels.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: "false")  # exits 1, prints nothing
    monkeypatch.setattr(cpu_kernels, "_status", {})
    assert cpu_kernels.kernels.__wrapped__() is None
    assert cpu_kernels._status["cpu"].startswith("PyTorch's kernels: build failed: false failed")
    assert list((tmp_path / "kernels").iterdir()) == []


def test_build_is_cached_by_source_and_flags(monkeypatch, tmp_path):
    kernel = _kernel()
    monkeypatch.setenv("ZLOCAL_HOME", str(tmp_path))
    cc = cpu_kernels._compiler()
    first = cpu_kernels._build(cc)
    assert first.parent == tmp_path / "kernels" and first.exists()
    assert first.name == kernel.path.name  # the key is the source, flags and compiler

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert cpu_kernels._build(cc) == first  # same source and flags: the cached library
    monkeypatch.setattr(cpu_kernels, "CFLAGS", [*cpu_kernels.CFLAGS, "-DZLOCAL_TEST"])
    with pytest.raises(AssertionError, match="compiled again"):
        cpu_kernels._build(cc)


@pytest.mark.parametrize("which", ["int4", "int8", "int4 dequantized"])
def test_a_wrong_kernel_fails_its_self_check(which):
    kernel = _kernel()

    class Off:
        path = kernel.path

        def int4_mm(self, *args):
            y = kernel.int4_mm(*args).float()
            return (y * (1.05 if which == "int4" else 1)).to(torch.bfloat16)  # 5%: far beyond rounding

        def int8_mm(self, *args):
            y = kernel.int8_mm(*args).float()
            return (y * (1.05 if which == "int8" else 1)).to(torch.bfloat16)

        def int4_dequantize(self, out, *args):
            kernel.int4_dequantize(out, *args)
            if which == "int4 dequantized":
                out.mul_(1.05)

    assert re.search(rf"\({which}[,)]", cpu_kernels_check._matmul_check(Off()))
    assert cpu_kernels_check._matmul_check(kernel) is None


@pytest.mark.parametrize("threads", [1, 2])
def test_decode_stack_self_check(threads, monkeypatch):
    # the whole-layer decode kernel is checked against a float layer before any model uses it
    kernel = _kernel()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert cpu_kernels_check._stack_check(kernel) is None

    class Off:
        def _decode(self, dims, layers, h, *args):
            err = kernel._decode(dims, layers, h, *args)
            hidden = ctypes.cast(dims, ctypes.POINTER(cpu_kernels._Dims)).contents.hidden
            out = torch.frombuffer((ctypes.c_uint16 * hidden).from_address(h), dtype=torch.bfloat16)
            out.mul_(1.05)  # 5%: far beyond rounding
            return err

    assert "decode self-check" in cpu_kernels_check._stack_check(Off())


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_kernel_matches_float_reference(tokens, threads):
    kernel = _kernel()
    gen = torch.Generator().manual_seed(tokens)
    n, k = 4 * 37, 576
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    q[0, :64] = -128  # the extreme codes
    q[1, :64] = 127
    scales = (torch.rand(n, generator=gen) * 0.01).to(torch.bfloat16)
    x = torch.randn(tokens, k, generator=gen).to(torch.bfloat16)
    exact = (x.float() @ q.float().t()) * scales.float()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = kernel.int8_mm(x, cpu_kernels.pack_int8(q), scales)
    finally:
        torch.set_num_threads(saved)
    bound = exact.abs() * 2**-8 + 1e-5 * exact.abs().max()
    assert ((y.float() - exact).abs() <= bound).all()


def test_int8_packing_round_trip_and_module():
    q = torch.randint(-128, 128, (8, 128), dtype=torch.int8)
    packed = cpu_kernels.pack_int8(q)
    assert packed.shape == q.shape and torch.equal(packed.reshape(2, 2, 4, 64)[1, 1, 2], q[6, 64:])
    out = torch.empty_like(q)
    cpu_kernels.unpack_int8(out, packed)
    assert torch.equal(out, q)
    _kernel()
    torch.manual_seed(0)
    w = torch.randn(96, 576) * 0.05
    ours = cpu_quant.quantize_linear(w, None, 8, torch.bfloat16)
    theirs = cpu_quant.quantize_linear(w, None, 8, torch.bfloat16, layout="torch")
    assert (ours.layout, theirs.layout, ours.row_block, theirs.row_block) == ("zlocal", "torch", 4, 1)
    for tokens in (1, 5, 40):  # kernel, kernel per token, block-wise from the tiles
        x = torch.randn(tokens, 576).to(torch.bfloat16)
        a, b = ours(x).float(), theirs(x).float()
        assert ((a - b).abs() <= 2 * b.abs() * 2**-8 + 1e-3 * b.abs().max()).all()


def test_profile_reports_whether_the_own_kernels_run():
    from zlocal.planning.hardware import profile_machine

    kernels = profile_machine(measure_bandwidth=False).kernels
    runs = cpu_kernels.kernels() is not None
    assert kernels["zlocal_int4_cpu"] == kernels["zlocal_int8_cpu"] == runs
