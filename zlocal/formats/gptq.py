"""GPTQ checkpoints (2-8 bits, grouped, with zero points), run by gptqmodel's kernels."""

from __future__ import annotations

import math
from dataclasses import dataclass

from zlocal.formats.base import WeightFormat, kernel_move_note


@dataclass(frozen=True)
class Gptq(WeightFormat):
    """Packed codes, packed zero points and a float16 scale per group, plus the act-order index."""

    def linear_bytes(self, out_f: int, in_f: int, *, compute_bytes: int, bits: int, group_size: int) -> int:
        groups = math.ceil(in_f / group_size)
        n = out_f * in_f
        return n * bits // 8 + groups * out_f * bits // 8 + groups * out_f * 2 + in_f * 4

    def why_not_on(self, kernels: dict, device: str) -> str | None:
        names = ("gptqmodel_marlin", "gptqmodel_exllama") if device == "cuda" else ("gptqmodel_torch",)
        if any(kernels.get(k) for k in names):
            return None
        return "GPTQ checkpoints need gptqmodel's kernels, missing here: pip install 'zlocal[gptq]'"

    def conversion(self, method: str, bits: int):
        from zlocal.conversion.convert_methods import GptqConversion

        return GptqConversion(method, bits)

    def use_cpu_kernels(self, model, path, dtype) -> str | None:
        from zlocal.formats.gptq_cpu import swap_gptq_for_cpu

        swapped, why_not = swap_gptq_for_cpu(model, path, dtype)
        return kernel_move_note("GPTQ layers", swapped, why_not, "gptqmodel's kernel")

    def bits_of(self, source_bits: int | None) -> int:
        return self.bits if source_bits is None else source_bits


GPTQ = Gptq(
    "gptq",
    4,
    quality=0.96,
    gpu_share=0.6,
    grouped=True,
    convert_methods=(("gptq4", 4), ("gptq8", 8)),
    quant_method="gptq",
    label="GPTQ",
    library_bytes=120 << 20,  # SmolLM2 gptq4 on the 2-core VM: +0.10 GiB anonymous, +0.16 GiB library pages
)
