"""The int4 format on CUDA: PyTorch's own int4 kernel (``torch._weight_int4pack_mm``, the "tinygemm"
kernel gpt-fast and torchao use; compute capability 8.0+, bf16 activations).

The format is the one zlocal's CPU int4 uses: 4-bit codes q in 0..15 and, per group of input
weights, a scale and a zero with ``w = (q - 8) * scale + zero`` (``scales_and_zeros`` [K/G, N, 2]).
Only the packing differs: the CUDA kernel takes the codes as bytes holding two codes each (even
input index in the high nibble) converted by ``torch._convert_weight_to_int4pack`` into its tiled
layout. Layers come from a full-precision weight quantized on load (``quantize_int4``, the CPU
format's quantizer) or from a GPTQ layer's codes (``from_gptq``: the codes stay, scale = s and
zero = (8 - z) * s, as ``zlocal.formats.gptq_cpu`` does for the CPU kernel).

Nothing here needs CUDA to import. A module built for another device keeps the byte layout and
computes through ``dequantize`` (the reference the CUDA kernel is checked against), so the packing
and the math are tested on the CPU and only the kernel call needs a GPU.
"""

from __future__ import annotations

import torch
from torch import nn

INNER_K_TILES = 8  # the kernel's K tiling: input features in multiples of 16 * 8
GROUP_SIZES = (32, 64, 128, 256)
N_MULTIPLE = 8


def supports(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the CUDA int4 kernel takes an (out, in) layer with groups of ``group_size``."""
    return (
        out_features > 0
        and out_features % N_MULTIPLE == 0
        and in_features % (16 * INNER_K_TILES) == 0
        and group_size in GROUP_SIZES
        and in_features % group_size == 0
    )


def to_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int codes 0..15 [N, K] -> uint8 [N, K/2], code 2i in the high nibble of byte i."""
    c = codes.to(torch.int32)
    return ((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8)


def from_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> int32 codes [N, K] (inverse of ``to_nibbles``)."""
    p = packed.to(torch.int32)
    return torch.stack([p >> 4, p & 15], dim=-1).reshape(p.shape[0], -1)


def dequantize(codes: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 [N, K] weight: ``(q - 8) * scale + zero`` per group (``scales_and_zeros`` [K/G, N, 2])."""
    sz = scales_and_zeros.float()
    scale = sz[..., 0].t().repeat_interleave(group_size, dim=1)  # [N, K]
    zero = sz[..., 1].t().repeat_interleave(group_size, dim=1)
    return (codes.float() - 8.0) * scale + zero


class CudaInt4Linear(nn.Module):
    """A Linear layer on PyTorch's CUDA int4 kernel (``tinygemm`` True), or on its reference
    (dequantize, then matmul) where that kernel is not used."""

    def __init__(self, in_features: int, out_features: int, group_size: int, dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.dtype = dtype
        self.tinygemm = False
        self.register_buffer("weight", torch.empty(0, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(0, dtype=dtype))
        self.bias = None

    @classmethod
    def from_codes(cls, codes, scales_and_zeros, group_size: int, *, device, dtype=torch.bfloat16,
                   bias=None, kernel: bool | None = None) -> CudaInt4Linear:
        """A module holding ``codes`` [N, K] and ``scales_and_zeros`` [K/G, N, 2] on ``device``;
        ``kernel``: pack for the CUDA kernel (default: when ``device`` is CUDA)."""
        n, k = codes.shape
        mod = cls(k, n, group_size, dtype)
        device = torch.device(device)
        nibbles = to_nibbles(codes).to(device)
        mod.tinygemm = device.type == "cuda" if kernel is None else kernel
        if mod.tinygemm:
            mod.weight = torch._convert_weight_to_int4pack(nibbles.contiguous(), INNER_K_TILES)
        else:
            mod.weight = nibbles
        mod.scales_and_zeros = scales_and_zeros.to(device=device, dtype=dtype).contiguous()
        if bias is not None:
            mod.bias = bias.to(device=device, dtype=dtype)
        return mod

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int, *, device, dtype=torch.bfloat16, bias=None,
                 kernel: bool | None = None) -> CudaInt4Linear:
        """Quantize a full-precision [N, K] weight (asymmetric min/max groups, zlocal's int4)."""
        from zlocal.kernels.cpu_quant import quantize_int4

        codes, sz = quantize_int4(weight.to(device), group_size)
        return cls.from_codes(codes, sz, group_size, device=device, dtype=dtype, bias=bias, kernel=kernel)

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, group_size: int, v1_zeros: bool, *, device,
                  dtype=torch.bfloat16, bias=None, kernel: bool | None = None) -> CudaInt4Linear:
        """A 4-bit GPTQ layer (in-order groups) rebuilt for this kernel; its codes stay as they are."""
        from zlocal.formats.gptq_cpu import unpack, zero_points

        codes = unpack(qweight, 4, 0).t().contiguous()  # [N, K]
        zeros = zero_points(qzeros, 4, codes.shape[0], v1_zeros)  # [K/G, N]
        s = scales.float()
        sz = torch.stack([s, (8 - zeros) * s], dim=-1)
        return cls.from_codes(codes, sz, group_size, device=device, dtype=dtype, bias=bias, kernel=kernel)

    def codes(self) -> torch.Tensor:
        """The int32 codes [N, K] (reference layout only: the kernel's tiling is not unpacked)."""
        if self.tinygemm:
            raise ValueError("the codes of a module packed for the CUDA kernel are not kept")
        return from_nibbles(self.weight)

    def dequantized(self) -> torch.Tensor:
        """The float32 [N, K] weight this module multiplies by (reference layout, or through the kernel)."""
        if not self.tinygemm:
            return dequantize(self.codes(), self.scales_and_zeros, self.group_size)
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.weight.device)
        w_t = torch._weight_int4pack_mm(eye, self.weight, self.group_size, self.scales_and_zeros)
        return w_t.t().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.tinygemm:
            y = torch._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight, self.group_size,
                                          self.scales_and_zeros)
        else:
            y = x2.float() @ self.dequantized().t()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = "torch._weight_int4pack_mm" if self.tinygemm else "reference"
        return f"{self.in_features}, {self.out_features}, group_size={self.group_size}, kernel={kernel}"
