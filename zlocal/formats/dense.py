"""Full-precision weights (fp32, bf16, fp16): every kernel runs them."""

from __future__ import annotations

from dataclasses import dataclass

from zlocal.formats.base import WeightFormat


@dataclass(frozen=True)
class DenseFormat(WeightFormat):
    """Weights held as floats of ``bits`` bits."""

    dense: bool = True

    def linear_bytes(self, out_f: int, in_f: int, *, compute_bytes: int, bits: int, group_size: int) -> int:
        return out_f * in_f * self.bits // 8


FP32 = DenseFormat("fp32", 32, quality=1.0, gpu_share=0.75, smaller_on_cpu="bf16")
BF16 = DenseFormat("bf16", 16, quality=1.0, gpu_share=0.75, smaller_on_cpu="int8")
FP16 = DenseFormat("fp16", 16, quality=1.0, gpu_share=0.75, smaller_on_cpu="int8")
