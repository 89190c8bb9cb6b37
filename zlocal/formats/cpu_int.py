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
    """Packed 4-bit codes, a scale and a zero point per group of input weights. On CUDA (compute
    capability 8.0+) the same codes and groups run on PyTorch's int4 kernel (``cuda_int4``)."""

    def build_linear(self, module, weight, *, dtype, device: str, group_size: int):
        if device == "cpu":
            return super().build_linear(module, weight, dtype=dtype, device=device, group_size=group_size)
        import torch

        from zlocal.formats.cuda_int4 import CudaInt4Linear, supports

        out_f, in_f = weight.shape
        if dtype != torch.bfloat16 or not supports(out_f, in_f, group_size):
            return None  # the layer stays in the compute dtype
        return CudaInt4Linear.quantize(weight, group_size, device=device, dtype=dtype)

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
        if device == "cpu":
            return kernels.get("torch_int4_cpu", True)
        return bool(kernels.get("torch_int4_cuda"))

    def why_not_on(self, kernels: dict, device: str) -> str | None:
        if device == "cpu" or kernels.get("torch_int4_cuda"):
            return None
        return (
            f"{self.name} on the GPU needs PyTorch's int4 kernel (CUDA, compute capability 8.0+); "
            "older GPUs run 4 bits as bitsandbytes nf4"
        )

    def gpu_kernel(self) -> str:
        return "PyTorch's int4 kernel (_weight_int4pack_mm, compute capability 8.0+)"


INT8 = CpuInt8("int8", 8, quality=0.995, smaller_on_cpu="int4", zlocal_kernel=True)
# gpu_share from the anchors, not measured here: int4 weight-only on PyTorch's kernel, decode step
# captured, reads 0.43-0.57 of the bandwidth at batch 1 once the per-layer overhead is counted apart
# (torchao H100 Llama-3.1-8B 241 tok/s, gpt-fast A100 Llama-2-7B 197 tok/s)
INT4 = CpuInt4("int4", 4, quality=0.93, gpu_share=0.5, zlocal_kernel=True, grouped=True, gpu_graph=True)
