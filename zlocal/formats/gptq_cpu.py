"""4-bit GPTQ checkpoints on zlocal's own CPU int4 kernel (and so on its one-call decode step).

transformers loads GPTQ layers through gptqmodel, whose CPU kernel decodes a 4-bit SmolLM2 at 68 tok/s
on a 2-core AVX-512 VM (186-190 on zlocal's decode kernel). A GPTQ layer stores 4-bit codes q, per-group
scales s and integer zero points z, w = s * (q - z); zlocal's int4 layout stores w = (q - 8) * scale +
zero per group, so the codes are kept as they are and scale = s, zero = (8 - z) * s (both rounded to
bf16, as zlocal's own int4 layers are). The tensors are read from the checkpoint's safetensors in the
GPTQ format itself, not from gptqmodel's repacked buffers, and each converted layer is checked against
the loaded GPTQ layer on random inputs before it replaces it. Layers it cannot take (act-order groups,
8 bits, shapes outside the kernel's layout) keep gptqmodel's kernel.
"""

from __future__ import annotations

from pathlib import Path

import torch

from zlocal.checkpoint.checkpoint_io import TensorStore
from zlocal.formats import GPTQ, checkpoint_format
from zlocal.kernels import cpu_kernels
from zlocal.kernels.cpu_quant import Int4WeightOnlyLinear


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words holding 32/bits values (value j at bit bits*j) -> the values, along ``dim``."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    p = packed.to(torch.int32)
    if dim == 0:  # qweight [K/per, N] -> [K, N]
        return ((p[:, None, :] >> shifts[None, :, None]) & mask).reshape(p.shape[0] * per, p.shape[1])
    return ((p[:, :, None] >> shifts[None, None, :]) & mask).reshape(p.shape[0], -1)  # qzeros -> [G, N]


# gptqmodel's ``checkpoint_format`` of the original GPTQ layout ("gptq_v2" keeps z, not z - 1)
V1_CHECKPOINT_FORMAT = "gptq"


def stores_v1_zeros(qc: dict) -> bool:
    """True when the checkpoint keeps z - 1 (the original GPTQ format); gptqmodel's v2 keeps z."""
    return (qc.get("checkpoint_format") or qc.get("format") or V1_CHECKPOINT_FORMAT) == V1_CHECKPOINT_FORMAT


def zero_points(qzeros: torch.Tensor, bits: int, n: int, v1_zeros: bool) -> torch.Tensor:
    """Each group's integer zero point z as floats [K/G, N] (``v1_zeros``: stored as z - 1)."""
    return unpack(qzeros, bits, 1)[:, :n].float() + (1 if v1_zeros else 0)


def act_order(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when rows are not grouped in order (desc_act checkpoints), which neither zlocal's kernel
    nor its scale tuning reads."""
    return not torch.equal(g_idx.long(), torch.arange(g_idx.numel()) // group_size)


def int4_module(qweight, qzeros, scales, group_size: int, v1_zeros: bool, dtype, bias=None):
    """zlocal's int4 module holding a GPTQ layer's weights (``v1_zeros``: the checkpoint stores z - 1,
    the original GPTQ format; gptqmodel's v2 stores z)."""
    codes = unpack(qweight, 4, 0).t().contiguous()  # [N, K]
    n, k = codes.shape
    zeros = zero_points(qzeros, 4, n, v1_zeros)
    s = scales.float()
    sz = torch.stack([s, (8 - zeros) * s], dim=-1).to(dtype)  # [K/G, N, 2]
    module = Int4WeightOnlyLinear(k, n, bias is not None, dtype, group_size, layout="zlocal")
    module.weight = cpu_kernels.pack_int4(codes)
    module.scales_and_zeros = cpu_kernels.pack_scales(sz)
    if bias is not None:
        module.bias = bias.to(dtype)
    return module


def _agrees(new, old, in_features: int, dtype) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, in_features, generator=gen).to(dtype)
    with torch.inference_mode():
        want, got = old(x).float(), new(x).float()
    return (got - want).abs().max().item() <= 0.02 * want.abs().max().item()


def swap_gptq_for_cpu(model, path: str | Path, dtype: torch.dtype) -> tuple[int, str | None]:
    """Replace the loaded 4-bit GPTQ layers of ``model`` by zlocal int4 modules built from the
    checkpoint at ``path``; returns (layers swapped, why the others were not, or None)."""
    qc = getattr(model.config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else {})
    if checkpoint_format(qc) is not GPTQ or int(qc.get("bits") or 0) != 4:
        return 0, "only 4-bit GPTQ layers go on zlocal's kernel"
    if dtype != torch.bfloat16 or cpu_kernels.kernels() is None:
        return 0, f"zlocal's int4 kernel needs bf16 and {cpu_kernels.kernel_status()}"
    group = int(qc.get("group_size") or 0)
    v1_zeros = stores_v1_zeros(qc)
    swapped, skipped = 0, None
    store = TensorStore(Path(path))
    try:
        for key in sorted(k for k in store if k.endswith(".qweight")):
            prefix = key[: -len(".qweight")]
            qweight = store[key]
            k, n = qweight.shape[0] * 8, qweight.shape[1]
            # before act_order, which would call per-channel (-1) groups out of order
            if group <= 0 or not cpu_kernels.supports_int4(n, k, group):
                what = "per-channel scales" if group <= 0 else f"groups of {group}"
                skipped = f"a {n}x{k} layer with {what} is outside the kernel's layout"
                continue
            g_idx = store.get(f"{prefix}.g_idx")
            if g_idx is not None and act_order(g_idx, group):
                skipped = "act-order (desc_act) groups"
                continue
            new = int4_module(
                qweight,
                store[f"{prefix}.qzeros"],
                store[f"{prefix}.scales"],
                group,
                v1_zeros,
                dtype,
                store.get(f"{prefix}.bias"),
            )
            parent_name, _, child = prefix.rpartition(".")
            parent = model.get_submodule(parent_name)
            if not _agrees(new, getattr(parent, child), k, dtype):
                skipped = f"{prefix} did not match the GPTQ kernel's output"
                continue
            setattr(parent, child, new)
            swapped += 1
    finally:
        store.close()
    return swapped, skipped
