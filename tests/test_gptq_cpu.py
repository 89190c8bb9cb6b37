"""GPTQ tensors -> zlocal's int4 layout: the same weights, in both zero-point conventions."""

from __future__ import annotations

import pytest
import torch

from zlocal.formats.gptq_cpu import int4_module
from zlocal.kernels import cpu_kernels


def _pack(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Eight 4-bit values per int32 word along ``dim`` (value j at bits 4j), as GPTQ stores them."""
    v = values.to(torch.int64)
    if dim == 0:
        v = v.view(-1, 8, v.shape[1])
        words = sum(v[:, j] << (4 * j) for j in range(8))
    else:
        v = v.view(v.shape[0], -1, 8)
        words = sum(v[:, :, j] << (4 * j) for j in range(8))
    return (words - (words >= 2**31) * 2**32).to(torch.int32)  # two's complement, like the files


@pytest.mark.parametrize("v1_zeros", [True, False])
@pytest.mark.parametrize("group", [32, 64])
def test_gptq_layer_becomes_the_same_int4_weights(v1_zeros, group):
    if cpu_kernels.kernels() is None:
        pytest.skip(f"needs zlocal's AVX-512 BF16 kernels: {cpu_kernels.kernel_status()}")
    gen = torch.Generator().manual_seed(0)
    n, k = 96, 256
    codes = torch.randint(0, 16, (k, n), generator=gen)  # GPTQ: [in, out]
    zeros = torch.randint(1, 15, (k // group, n), generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).half()
    stored_zeros = zeros - 1 if v1_zeros else zeros
    module = int4_module(_pack(codes, 0), _pack(stored_zeros, 1), scales, group, v1_zeros, torch.bfloat16)
    g = torch.arange(k) // group
    w = (codes.float() - zeros[g].float()) * scales.float()[g]  # [in, out]: s * (q - z)
    x = torch.randn(5, k, generator=gen).to(torch.bfloat16)
    want = x.float() @ w
    got = module(x).float()
    assert (got - want).abs().max() <= 0.01 * want.abs().max()
    # one token takes the decode kernel's path; the layout round-trips to the same codes
    assert (module(x[:1]).float() - want[:1]).abs().max() <= 0.01 * want.abs().max()
    back = torch.empty(n, k, dtype=torch.uint8)
    cpu_kernels.unpack_int4(back, module.weight)
    assert torch.equal(back.long(), codes.t())
