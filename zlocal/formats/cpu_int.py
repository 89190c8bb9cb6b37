"""zlocal's CPU formats: int8 per output channel and int4 in groups, quantized on load.

They run on zlocal's AVX-512 kernels where those pass their self-check, else on PyTorch's
weight-only kernels (see zlocal.kernels.cpu_quant for the per-shape support predicates).
"""

from __future__ import annotations

from dataclasses import dataclass

from zlocal.formats.base import WeightFormat


class _CpuKernelFormat(WeightFormat):
    """Shared by int8 and int4: quantized on load into zlocal.kernels.cpu_quant's modules."""

    def build_linear(self, module, weight, *, dtype, device: str, group_size: int):
        import torch

        from zlocal.kernels.cpu_quant import can_quantize, quantize_linear

        if device != "cpu" or not can_quantize(tuple(weight.shape), self.bits, group_size):
            return None
        new = quantize_linear(weight, None, self.bits, dtype, group_size)
        if module.bias is not None:  # filled when the bias tensor arrives
            new.register_buffer("bias", torch.empty(new.out_features, dtype=dtype))
        return new


@dataclass(frozen=True)
class CpuInt8(_CpuKernelFormat):
    """int8 codes, one scale per output row (in the compute dtype)."""

    def linear_bytes(self, out_f: int, in_f: int, *, compute_bytes: int, bits: int, group_size: int) -> int:
        return out_f * in_f + out_f * compute_bytes

    def quantized_on_load(self, kernels: dict, device: str) -> bool:
        return device == "cpu" and kernels.get("torch_int8_cpu", True)

    def why_not_on(self, kernels: dict, device: str) -> str | None:
        return None if device == "cpu" else f"{self.name} is zlocal's CPU format; GPUs run other formats"


@dataclass(frozen=True)
class CpuInt4(_CpuKernelFormat):
    """Packed 4-bit codes, a scale and a zero point per group of input weights."""

    def linear_bytes(self, out_f: int, in_f: int, *, compute_bytes: int, bits: int, group_size: int) -> int:
        # as the quantizer does: shapes no int4 layout takes stay in the compute dtype
        from zlocal.kernels.cpu_quant import can_quantize, int4_group_size

        if not can_quantize((out_f, in_f), 4, group_size):
            return out_f * in_f * compute_bytes
        g = int4_group_size(in_f, group_size)
        return out_f * in_f // 2 + (in_f // g) * out_f * 2 * compute_bytes

    def _cpu_share_per_core(self, own_kernels: bool) -> float:
        # PyTorch's int4 kernel unpacks to floats and is compute-bound on few cores; zlocal's
        # AVX-512 BF16 kernel read at 79-85% of the bound on the 7B shape with 2 cores
        return 0.42 if own_kernels else 0.28

    def quantized_on_load(self, kernels: dict, device: str) -> bool:
        return device == "cpu" and kernels.get("torch_int4_cpu", True)

    def why_not_on(self, kernels: dict, device: str) -> str | None:
        return None if device == "cpu" else f"{self.name} is zlocal's CPU format; GPUs run other formats"


INT8 = CpuInt8("int8", 8, quality=0.995, smaller_on_cpu="int4", zlocal_kernel=True)
INT4 = CpuInt4("int4", 4, quality=0.93, zlocal_kernel=True, grouped=True)
