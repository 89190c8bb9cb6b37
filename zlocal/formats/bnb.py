"""bitsandbytes formats: LLM.int8 and 4-bit NF4/FP4 (blockwise absmax, double-quantized)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from zlocal.formats.base import CPU_SHARE_MAX, WeightFormat, kernel_move_note


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        from zlocal.errors import DependencyError

        raise DependencyError(
            "this plan quantizes GPU layers with bitsandbytes; pip install bitsandbytes"
        ) from exc
    return bnb


BLOCKSIZE_4BIT = 64  # what transformers/bitsandbytes use for Params4bit by default


@dataclass(frozen=True)
class BnbInt8(WeightFormat):
    """int8 codes with an fp32 scale per output row."""

    def quantize_tensor(self, name: str, w, compute_dtype) -> dict:
        """The state-dict entries transformers saves for weight ``name`` (a full-precision tensor)."""
        import bitsandbytes.functional as bnbf
        import torch

        cb, scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))  # as bitsandbytes' Int8Params does
        prefix = name[: -len("weight")]
        # transformers saves the 'row' layout as code 0 (INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING)
        return {
            name: cb.contiguous(),
            prefix + "SCB": scb.float().contiguous(),
            prefix + "weight_format": torch.tensor(0, dtype=torch.uint8),
        }

    def quantization_config(self, compute_dtype) -> dict:
        """The ``quantization_config`` block transformers writes for checkpoints in this format."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True).to_dict()

    def stored_bytes(self, numel: int, out_features: int) -> int:
        """Bytes a converted weight of ``numel`` elements takes on disk (with its scales)."""
        return numel + 4 * out_features + 1

    def build_linear(self, module, weight, *, dtype, device: str, group_size: int):
        if device == "cpu":
            return None  # on the CPU only checkpoints stored in it run in it
        import torch

        bnb = _bnb()
        new = bnb.nn.Linear8bitLt(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            has_fp16_weights=False,
            threshold=6.0,
            device="meta",
        )
        new.weight = bnb.nn.Int8Params(
            weight.to(torch.float16), requires_grad=False, has_fp16_weights=False
        ).to(device)
        return new

    def linear_bytes(self, out_f: int, in_f: int, *, compute_bytes: int, bits: int, group_size: int) -> int:
        return out_f * in_f + out_f * 4

    def why_not_on(self, kernels: dict, device: str) -> str | None:
        if device == "cpu" or kernels.get("bitsandbytes_cuda"):
            return None
        return f"{self.name} on the GPU needs bitsandbytes' CUDA kernels (pip install bitsandbytes)"

    def quantized_on_load(self, kernels: dict, device: str) -> bool:
        return device == "cuda" and bool(kernels.get("bitsandbytes_cuda"))

    def conversion(self, method: str, bits: int):
        from zlocal.conversion.convert_methods import BnbConversion

        return BnbConversion(method, bits)

    def use_cpu_kernels(self, model, path, dtype) -> str | None:
        swapped = swap_bnb_int8_for_cpu(model, dtype)
        return f"bitsandbytes int8 layers ({swapped}) run on the fused CPU int8 kernel" if swapped else None


@dataclass(frozen=True)
class Bnb4bit(WeightFormat):
    """4-bit codes, one absmax per 64 weights (uint8 after double quantization)."""

    offered_on_load: bool = False

    def quantize_tensor(self, name: str, w, compute_dtype) -> dict:
        """The state-dict entries transformers saves for weight ``name`` (a full-precision tensor)."""
        import bitsandbytes.functional as bnbf
        import torch

        packed, state = bnbf.quantize_4bit(
            w,
            blocksize=BLOCKSIZE_4BIT,
            compress_statistics=True,
            quant_type=self.name,
            quant_storage=torch.uint8,
        )
        out = {name: packed.contiguous()}
        for k, v in state.as_dict(packed=True).items():
            out[f"{name}.{k}"] = v.contiguous()
        return out

    def quantization_config(self, compute_dtype) -> dict:
        """The ``quantization_config`` block transformers writes for checkpoints in this format."""
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.name,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
        ).to_dict()

    def stored_bytes(self, numel: int, out_features: int) -> int:
        """4 bits per weight, 1 byte absmax per 64-block (double quant), a small fixed state."""
        return numel // 2 + numel // BLOCKSIZE_4BIT + 1500

    def build_linear(self, module, weight, *, dtype, device: str, group_size: int):
        if device == "cpu":
            return None  # on the CPU only checkpoints stored in it run in it
        bnb = _bnb()
        new = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=dtype,
            compress_statistics=True,
            quant_type=self.name,
            device="meta",
        )
        new.weight = bnb.nn.Params4bit(
            weight.to(dtype), requires_grad=False, compress_statistics=True, quant_type=self.name
        ).to(device)
        return new

    def linear_bytes(self, out_f: int, in_f: int, *, compute_bytes: int, bits: int, group_size: int) -> int:
        n = out_f * in_f
        blocks = math.ceil(n / 64)
        # double quant: uint8 absmax per block, fp32 absmax + offset per 256 blocks, 256-entry code
        return n // 2 + blocks + math.ceil(blocks / 256) * 8 + 256 * 4

    def why_not_on(self, kernels: dict, device: str) -> str | None:
        if device == "cpu" or kernels.get("bitsandbytes_cuda"):
            return None
        return f"{self.name} on the GPU needs bitsandbytes' CUDA kernels (pip install bitsandbytes)"

    def quantized_on_load(self, kernels: dict, device: str) -> bool:
        return self.offered_on_load and device == "cuda" and bool(kernels.get("bitsandbytes_cuda"))

    def cpu_share(self, cores: int, own_kernels: bool = False, compute: str = "bf16") -> float:
        # on zlocal's int4 kernel (bnb4_cpu, bf16 only) as its own int4; bitsandbytes' CPU path
        # dequantizes the whole weight for every product (0.48x llama.cpp's decode on SmolLM2)
        per_core = 0.42 if own_kernels and compute == "bf16" else 0.12
        return min(CPU_SHARE_MAX, per_core * max(1, cores))

    def one_call_decode(self, own_kernels: bool) -> bool:
        return own_kernels

    def conversion(self, method: str, bits: int):
        from zlocal.conversion.convert_methods import BnbConversion

        return BnbConversion(method, bits)

    def use_cpu_kernels(self, model, path, dtype) -> str | None:
        from zlocal.formats.bnb4_cpu import swap_bnb4_for_cpu

        swapped, why_not = swap_bnb4_for_cpu(model, dtype)
        return kernel_move_note(f"bitsandbytes {self.name} layers", swapped, why_not, "bitsandbytes' kernel")


def swap_bnb_int8_for_cpu(model, dtype) -> int:
    """Replace bitsandbytes ``Linear8bitLt`` modules by zlocal's CPU int8 kernel; returns the count.

    bitsandbytes stores the int8 codes and per-row absmax (SCB), so ``w = codes * SCB / 127`` exactly:
    the swap changes no weight, only the kernel (bitsandbytes' CPU int8 path is ~80x slower and also
    quantizes activations).
    """
    import torch

    from zlocal.inference.loader_stream import replace_module
    from zlocal.kernels.cpu_quant import Int8WeightOnlyLinear

    count = 0
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Linear8bitLt" or getattr(module.weight, "SCB", None) is None:
            continue
        codes = module.weight.data
        if codes.dtype != torch.int8:
            continue
        new = Int8WeightOnlyLinear(module.in_features, module.out_features, module.bias is not None, dtype)
        new.weight = new.pack(codes)
        new.scales = (module.weight.SCB.float() / 127.0).to(dtype)
        if module.bias is not None:
            new.bias = module.bias.data.to(dtype)
        replace_module(model, name, new)
        count += 1
    return count


# From the anchors: bitsandbytes NF4 ~12 vs GPTQ ~21 tok/s on one GPU, LLM.int8 ~6.5 vs fp16 ~30.
_BNB = "bitsandbytes"
BNB_INT8 = BnbInt8(
    "bnb-int8", 8, quality=0.99, gpu_share=0.12, convert_methods=(("int8", 8),), quant_method=_BNB, label=_BNB
)
NF4 = Bnb4bit(
    "nf4",
    4,
    quality=0.94,
    gpu_share=0.35,
    convert_methods=(("nf4", 4),),
    quant_method=_BNB,
    label=_BNB,
    offered_on_load=True,
)
FP4 = Bnb4bit(
    "fp4", 4, quality=0.92, gpu_share=0.35, convert_methods=(("fp4", 4),), quant_method=_BNB, label=_BNB
)
