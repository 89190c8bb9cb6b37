"""int4 on CUDA (zlocal.formats.cuda_int4): packing and math checked on the CPU against PyTorch's CPU
int4 kernel (same (q - 8) * scale + zero convention) and GPTQ's formula; the kernel call on a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.test_gptq_cpu import _pack
from zlocal.formats import get_format
from zlocal.formats.cuda_int4 import CudaInt4Linear, dequantize, from_nibbles, supports, to_nibbles
from zlocal.kernels.cpu_quant import INNER_K_TILES, quantize_int4


def test_nibbles_round_trip_and_order():
    codes = torch.randint(0, 16, (16, 256), generator=torch.Generator().manual_seed(1))
    packed = to_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 128)
    assert torch.equal(from_nibbles(packed), codes.int())
    assert int(packed[0, 0]) == int(codes[0, 0]) * 16 + int(codes[0, 1])  # even index: high nibble


def test_packing_meets_the_cuda_ops_contract_on_meta_tensors():
    """The CUDA ops' shape and dtype checks (their meta kernels) accept what the module hands them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    codes, sz = quantize_int4(torch.randn(256, 512), 128)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        nibbles = mode.from_tensor(to_nibbles(codes))
        packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, 8)
        assert packed.dtype == torch.int32 and packed.shape == (256 // 8, 512 // 128, 32, 4)
        x = mode.from_tensor(torch.empty(3, 512, dtype=torch.bfloat16))
        y = torch.ops.aten._weight_int4pack_mm(x, packed, 128, mode.from_tensor(sz.to(torch.bfloat16)))
        assert y.shape == (3, 256) and y.dtype == torch.bfloat16
        with pytest.raises(RuntimeError, match="uint8"):  # the int32 codes themselves are refused
            torch.ops.aten._convert_weight_to_int4pack(mode.from_tensor(codes), 8)


def test_dequantize_matches_torchs_int4_convention():
    """The CPU int4 kernel computes (q - 8) * scale + zero per group: so must our reference."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen)
    codes, sz = quantize_int4(w, 64)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES)
    x = torch.randn(3, 256, generator=gen)
    want = torch._weight_int4pack_mm_for_cpu(x, packed, 64, sz)
    mod = CudaInt4Linear.from_codes(codes, sz, 64, device="cpu", dtype=torch.float32)
    assert not mod.tinygemm
    torch.testing.assert_close(mod(x), want, rtol=1e-4, atol=1e-4)
    # the quantizer's round trip stays within half a step of the weight
    err = (dequantize(codes, sz, 64) - w).abs()
    step = sz[..., 0].t().repeat_interleave(64, dim=1)
    assert (err <= step * 0.5 + 1e-6).all()


@pytest.mark.parametrize("v1_zeros", [True, False])
def test_gptq_codes_rebuild_the_same_weights(v1_zeros):
    gen = torch.Generator().manual_seed(0)
    n, k, group = 32, 256, 64
    codes = torch.randint(0, 16, (k, n), generator=gen)  # GPTQ: [in, out]
    zeros = torch.randint(1, 15, (k // group, n), generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).half()
    stored = zeros - 1 if v1_zeros else zeros
    mod = CudaInt4Linear.from_gptq(_pack(codes, 0), _pack(stored, 1), scales, group, v1_zeros, device="cpu",
                                   dtype=torch.float32)
    g = torch.arange(k) // group
    w = (codes.float() - zeros[g].float()) * scales.float()[g]  # s * (q - z), [in, out]
    torch.testing.assert_close(mod.dequantized(), w.t(), rtol=1e-5, atol=1e-6)
    assert torch.equal(mod.codes(), codes.t().int())


def test_supported_shapes_and_format_object():
    assert supports(4096, 4096, 128) and supports(14336, 4096, 128) and supports(4096, 14336, 128)
    assert not supports(4096, 100, 32) and not supports(12, 256, 64) and not supports(64, 256, 48)
    int4 = get_format("int4")
    sm80, sm75 = {"torch_int4_cuda": True}, {"torch_int4_cuda": False, "bitsandbytes_cuda": True}
    assert int4.quantized_on_load(sm80, "cuda") and not int4.quantized_on_load(sm75, "cuda")
    assert int4.why_not_on(sm80, "cuda") is None and "8.0" in int4.why_not_on(sm75, "cuda")
    assert int4.in_gpu_graph() and not get_format("nf4").in_gpu_graph()
    meta = torch.nn.Linear(256, 64, bias=False, device="meta")
    w = torch.randn(64, 256)
    # bf16 activations only: an fp16 plan keeps the layer dense
    assert int4.build_linear(meta, w, dtype=torch.float16, device="cuda:0", group_size=64) is None


@pytest.mark.gpu
def test_kernel_matches_the_reference_on_cuda():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs a CUDA GPU with compute capability 8.0+")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=gen)
    codes, sz = quantize_int4(w, 128)
    fast = CudaInt4Linear.from_codes(codes, sz, 128, device="cuda")
    ref = CudaInt4Linear.from_codes(codes, sz, 128, device="cuda", kernel=False)
    assert fast.tinygemm
    x = torch.randn(7, 512, generator=gen).to("cuda", torch.bfloat16)
    torch.testing.assert_close(fast(x).float(), ref(x).float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fast.dequantized(), ref.dequantized(), rtol=1e-2, atol=1e-2)
    built = get_format("int4").build_linear(torch.nn.Linear(512, 256, device="meta"), w, dtype=torch.bfloat16,
                                            device="cuda:0", group_size=128)
    assert built.tinygemm and built.weight.is_cuda
