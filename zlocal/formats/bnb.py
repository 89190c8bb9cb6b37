"""bitsandbytes formats: LLM.int8 and 4-bit NF4/FP4 (blockwise absmax, double-quantized)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import WeightFormat


@dataclass(frozen=True)
class BnbInt8(WeightFormat):
    """int8 codes with an fp32 scale per output row."""

    def linear_bytes(self, out_f: int, in_f: int, *, compute_bytes: int, bits: int, group_size: int) -> int:
        return out_f * in_f + out_f * 4

    def runs_on(self, kernels: dict, device: str) -> bool:
        return device == "cpu" or bool(kernels.get("bitsandbytes_cuda"))

    def quantized_on_load(self, kernels: dict, device: str) -> bool:
        return device == "cuda" and bool(kernels.get("bitsandbytes_cuda"))


@dataclass(frozen=True)
class Bnb4bit(WeightFormat):
    """4-bit codes, one absmax per 64 weights (uint8 after double quantization)."""

    offered_on_load: bool = False

    def linear_bytes(self, out_f: int, in_f: int, *, compute_bytes: int, bits: int, group_size: int) -> int:
        n = out_f * in_f
        blocks = math.ceil(n / 64)
        # double quant: uint8 absmax per block, fp32 absmax + offset per 256 blocks, 256-entry code
        return n // 2 + blocks + math.ceil(blocks / 256) * 8 + 256 * 4

    def runs_on(self, kernels: dict, device: str) -> bool:
        return device == "cpu" or bool(kernels.get("bitsandbytes_cuda"))

    def quantized_on_load(self, kernels: dict, device: str) -> bool:
        return self.offered_on_load and device == "cuda" and bool(kernels.get("bitsandbytes_cuda"))


# From the anchors: bitsandbytes NF4 ~12 vs GPTQ ~21 tok/s on one GPU, LLM.int8 ~6.5 vs fp16 ~30.
BNB_INT8 = BnbInt8("bnb-int8", 8, quality=0.99, gpu_share=0.12)
NF4 = Bnb4bit("nf4", 4, quality=0.94, gpu_share=0.35, offered_on_load=True)
FP4 = Bnb4bit("fp4", 4, quality=0.92, gpu_share=0.35)
