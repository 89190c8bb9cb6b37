"""bitsandbytes NF4/FP4 layers on zlocal's CPU int4 kernels (and so on its one-call decode step).

bitsandbytes' CPU path dequantizes a whole 4-bit weight to bf16 for every product: a converted nf4
SmolLM2 decoded at 66.5 tok/s on the 2-core VM, 0.48x llama.cpp on the same weights. A bitsandbytes
4-bit weight is w = table[q] * absmax per block of B consecutive weights (B = 64 by default; the
blocks run along the rows, so with in_features % B == 0 a block is a group of B inputs of one row).
zlocal's int4 kernel computes w = table[q] * scale + (zero - 8 * scale) per group with a 16-entry code
table, so the codes are kept as they are, the table becomes NF4's (or FP4's) 16 values, scale =
absmax and zero = 8 * scale, which cancels the kernel's zero-point term exactly. The double-quantized
absmax is decoded once, here, with bitsandbytes' own function. Table values and scales are rounded to
bf16 (relative error <= 2^-9 each, a small fraction of the 4-bit rounding error).
"""

from __future__ import annotations

import torch

# The first converted layer is compared with bitsandbytes' own dequantization: it catches a
# bitsandbytes release that packs codes differently before any token is wrong.
_CHECK_TOLERANCE = 0.02


def code_values(quant_type: str) -> torch.Tensor:
    """The 16 values bitsandbytes' 4-bit codes stand for ("nf4" or "fp4"), as floats."""
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type(quant_type, device="cpu").float()


def block_absmax(quant_state) -> torch.Tensor:
    """Each block's absmax as float32 (decoding the double quantization when the state has one)."""
    from bitsandbytes.functional import dequantize_blockwise

    if quant_state.nested:
        return (dequantize_blockwise(quant_state.absmax, quant_state.state2) + quant_state.offset).float()
    return quant_state.absmax.float()


def unpack_codes(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """bitsandbytes' packed bytes (element 2i in the high nibble, 2i+1 in the low) -> codes [N, K]."""
    b = packed.reshape(-1).view(torch.uint8)
    return torch.stack([b >> 4, b & 15], dim=-1).reshape(out_features, in_features)


def kernel_supports(quant_state, out_features: int, in_features: int) -> str | None:
    """Why the kernel cannot take this layer (None: it can)."""
    from zlocal.kernels import cpu_kernels

    block = int(quant_state.blocksize)
    if getattr(quant_state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a weight in place for its own AVX-512 kernel on its first CPU forward
        return "bitsandbytes repacked this weight for its CPU kernel (a forward ran before the swap)"
    if in_features % block:
        return f"blocks of {block} weights straddle the {in_features}-wide rows"
    if not cpu_kernels.supports_int4(out_features, in_features, block):
        return f"a {out_features}x{in_features} layer with blocks of {block} is outside the kernel's layout"
    return None


def int4_module(module, dtype: torch.dtype):
    """zlocal's int4 module computing what the loaded bitsandbytes ``Linear4bit`` ``module`` does."""
    from zlocal.kernels import cpu_kernels
    from zlocal.kernels.cpu_quant import Int4WeightOnlyLinear

    state = module.weight.quant_state
    n, k = module.out_features, module.in_features
    block = int(state.blocksize)
    codes = unpack_codes(module.weight.data, n, k)
    scale = block_absmax(state).reshape(n, k // block).to(dtype)
    sz = torch.stack([scale, scale * 8], dim=-1).transpose(0, 1)  # [K/B, N, 2]; 8 * a bf16 is exact
    # the table the state carries (bitsandbytes' NF4/FP4 values), else the format's
    code = getattr(state, "code", None)
    table = code.float().cpu() if code is not None else code_values(state.quant_type)
    new = Int4WeightOnlyLinear(k, n, module.bias is not None, dtype, block, codes=table)
    new.weight = cpu_kernels.pack_int4(codes)
    new.scales_and_zeros = cpu_kernels.pack_scales(sz.contiguous())
    if module.bias is not None:
        new.bias = module.bias.detach().to(dtype)
    return new


def _matches_bitsandbytes(new, module, dtype: torch.dtype) -> bool:
    """``new`` against the bitsandbytes layer it replaces, on a few random inputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, module.in_features, generator=gen).to(dtype)
    with torch.inference_mode():
        want, got = module(x).float(), new(x).float()
    return bool((got - want).abs().max() <= _CHECK_TOLERANCE * want.abs().max())


def swap_bnb4_for_cpu(model, dtype: torch.dtype) -> tuple[int, str | None]:
    """Replace the loaded bitsandbytes 4-bit layers of ``model`` by zlocal int4 modules with the
    format's code table; returns (layers swapped, why the others were not, or None)."""
    from zlocal.inference.loader_stream import replace_module
    from zlocal.kernels import cpu_kernels

    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    if not layers:
        return 0, None
    if dtype != torch.bfloat16 or cpu_kernels.kernels() is None:
        return 0, f"zlocal's int4 kernel needs bf16 and {cpu_kernels.kernel_status()}"
    swapped, skipped = 0, None
    for name, module in layers:
        state = getattr(module.weight, "quant_state", None)
        why = "no quantization state" if state is None else kernel_supports(state, module.out_features,
                                                                          module.in_features)
        if why:
            skipped = why
            continue
        new = int4_module(module, dtype)
        if swapped == 0 and not _matches_bitsandbytes(new, module, dtype):
            return 0, f"{name} did not match bitsandbytes' dequantization; kept bitsandbytes' kernel"
        replace_module(model, name, new)
        swapped += 1
    return swapped, skipped
