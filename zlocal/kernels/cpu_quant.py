"""Fast weight-only quantized Linear layers for the CPU part of a plan.

bitsandbytes' CPU path is a dequantize-then-matmul fallback (nf4 125 ms, int8 403 ms for one
4096x14336 linear here, against 9.6 ms in bf16). PyTorch ships fused CPU kernels that read the
small weights directly: ``_weight_int8pack_mm`` (per-channel int8, ~5 ms) and
``_weight_int4pack_mm_for_cpu`` (group-wise asymmetric int4, ~4.7 ms). Decode on a CPU is bound by
memory bandwidth, so halving or quartering the bytes read per token is what makes it usable.

On x86 CPUs with AVX-512 BF16, int4 layers run on zlocal's own kernel instead (``cpu_kernels``),
which reads its weights near memory bandwidth.

Two phases, as in gpt-fast: a handler first computes the quantized tensors (``quantize``), then
swaps ``nn.Linear`` modules for the quantized modules (``convert``). ``quantize_linear`` does both
for one weight, which is what the streaming loader uses to keep peak memory at one tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zlocal.errors import InvalidArgumentError
from zlocal.kernels import cpu_kernels
from zlocal.kernels.cpu_prompt import (
    DEQUANT_GEMM_MIN_TOKENS,
    INNER_K_TILES,
    INT4_PACK_BLOCKS,
    _blockwise,
    _unpack_int4,
    int4_blockwise_min_tokens,
    int4_matmul_blockwise,
    int4_pack_block,
    int8_matmul_blockwise,
)

_INNER_K_TILES = INNER_K_TILES
_INT4_N_MULTIPLE = 16
# _weight_int8pack_mm's vector loop: rows whose width is not a multiple of 16 are read past their end
_TORCH_INT8_K_MULTIPLE = 16
GROUP_SIZES = (128, 64, 32)


def int4_group_size(in_features: int, preferred: int = 128) -> int | None:
    """Largest supported group size <= ``preferred`` dividing ``in_features`` (None: none fits)."""
    for g in GROUP_SIZES:
        if g <= preferred and in_features % g == 0:
            return g
    return None


def torch_int8_supported(out_features: int, in_features: int) -> bool:
    """Whether ``_weight_int8pack_mm`` computes this shape correctly. On torch 2.14 (AVX-512) it
    reads past rows whose width is not a multiple of 16: K=100 crashes the process, K=8, 24, 40 or
    200 return inf/NaN (``tests/test_kernel_shapes.py`` draws both sides)."""
    return out_features > 0 and in_features > 0 and in_features % _TORCH_INT8_K_MULTIPLE == 0


def torch_int4_supported(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether ``_weight_int4pack_mm_for_cpu`` (and its packing) runs this shape: output rows in
    whole blocks of 16, a group size it implements dividing the input width."""
    return (
        out_features > 0
        and out_features % _INT4_N_MULTIPLE == 0
        and group_size in GROUP_SIZES
        and in_features % group_size == 0
    )


def can_quantize(linear_shape: tuple[int, int], bits: int, group_size: int = 128) -> bool:
    """True when an (out_features, in_features) weight can become a ``bits``-bit CPU module here.
    int8 always can (shapes no kernel runs use the ``dense`` layout: codes dequantized per call);
    int4 needs a group size in GROUP_SIZES dividing the input and a shape PyTorch's kernel runs
    (zlocal's runs all of those, and only in bf16), otherwise the layer stays in the compute dtype."""
    out_f, in_f = linear_shape
    if out_f < 1 or in_f < 1:
        return False
    if bits == 8:
        return True
    if bits == 4:
        g = int4_group_size(in_f, group_size)
        return g is not None and torch_int4_supported(out_f, in_f, g)
    return False


def kernel_for(linear_shape: tuple[int, int], bits: int, dtype: torch.dtype, group_size: int = 128) -> str:
    """Which code runs an (out_features, in_features) layer in ``bits`` here, for plans and reports:
    ``zlocal`` (zlocal's kernels), ``torch`` (PyTorch's weight-only kernel), ``dense`` (int8 codes
    dequantized per call) or ``unquantized`` (the layer stays in the compute dtype)."""
    out_f, in_f = linear_shape
    if not can_quantize(linear_shape, bits, group_size):
        return "unquantized"
    if bits == 8:
        return int8_layout(out_f, in_f, dtype)
    return int4_layout(out_f, in_f, int4_group_size(in_f, group_size), dtype)


# Rows quantized at a time: each block's float32 temporaries stay near 16 MiB, so quantizing a
# 32000x4096 head or a 14336x4096 projection on load does not hold several float32 copies of it
# (rows are independent, so the result is the same as in one pass).
_QUANT_BLOCK_ELEMS = 1 << 22


def _row_blocks(weight: torch.Tensor):
    out_f, in_f = weight.shape
    rows = max(1, _QUANT_BLOCK_ELEMS // max(1, in_f))
    for lo in range(0, out_f, rows):
        yield lo, min(out_f, lo + rows)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (int8 [out, in], fp32 scales [out])."""
    w_all = weight.detach()
    q = torch.empty(w_all.shape, dtype=torch.int8, device=w_all.device)
    scales = torch.empty(w_all.shape[0], dtype=torch.float32, device=w_all.device)
    for lo, hi in _row_blocks(w_all):
        w = w_all[lo:hi].float()
        s = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
        q[lo:hi] = torch.round(w / s[:, None]).clamp_(-128, 127)  # w may be the caller's tensor: no in-place
        scales[lo:hi] = s
    return q, scales


def quantize_int4(
    weight: torch.Tensor, group_size: int, codes_dtype: torch.dtype = torch.int32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 (min/max per group).

    Returns (codes 0..15 [out, in] in ``codes_dtype``: int32 for torch's packing, uint8 for zlocal's,
    a quarter of the bytes in flight; scales_and_zeros fp32 [in/group, out, 2]); the kernel
    dequantizes as ``(q - 8) * scale + zero``, so ``zero`` is the value of code 8.
    """
    w_all = weight.detach()
    out_f, in_f = w_all.shape
    if in_f % group_size:
        raise InvalidArgumentError(f"int4 group size {group_size} does not divide in_features {in_f}")
    q = torch.empty(w_all.shape, dtype=codes_dtype, device=w_all.device)
    sz = torch.empty(in_f // group_size, out_f, 2, dtype=torch.float32, device=w_all.device)
    for lo, hi in _row_blocks(w_all):
        wg = w_all[lo:hi].float().reshape(hi - lo, in_f // group_size, group_size)
        low = wg.amin(dim=-1, keepdim=True)
        scale = ((wg.amax(dim=-1, keepdim=True) - low) / 15.0).clamp(min=1e-8)
        q[lo:hi] = torch.round((wg - low) / scale).clamp(0, 15).reshape(hi - lo, in_f)
        zero = low + 8.0 * scale
        sz[:, lo:hi] = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1)
    return q, sz


class _QuantLinearBase(nn.Module):
    in_features: int
    out_features: int

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != self.dtype:
            x2 = x2.to(self.dtype)
        return x2 if x2.is_contiguous() else x2.contiguous()

    def _finish(self, y: torch.Tensor, shape: torch.Size, x_dtype: torch.dtype) -> torch.Tensor:
        # per-call overhead matters at batch 1: a 576x576 int8 matmul takes ~40 us
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(*shape[:-1], self.out_features)
        return y if y.dtype == x_dtype else y.to(x_dtype)

    # Output rows the weight layout interleaves (weights only split or join at multiples) in torch's
    # layout; zlocal's tiles are cpu_kernels.TILE_ROWS rows.
    torch_row_block = 1

    def _use_layout(self, layout: str) -> None:
        self.layout = layout
        self._kernel = cpu_kernels.kernels() if layout == "zlocal" else None

    @property
    def row_block(self) -> int:
        """Output rows the weight layout interleaves: weights only split or join at multiples."""
        return cpu_kernels.TILE_ROWS if self.layout == "zlocal" else self.torch_row_block

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, bias={self.bias is not None}, layout={self.layout}"


def int8_layout(out_features: int, in_features: int, dtype: torch.dtype) -> str:
    """How an int8 weight is stored here: ``"zlocal"`` (``cpu_kernels.pack_int8``'s tiles, when
    its kernel runs on this CPU and fits the shape), ``"torch"`` (row-major, for
    ``_weight_int8pack_mm``) or ``"dense"`` (row-major, dequantized per call: shapes neither
    kernel computes correctly)."""
    ours = dtype == torch.bfloat16 and cpu_kernels.supports_int8(out_features, in_features)
    if ours and cpu_kernels.kernels():
        return "zlocal"
    return "torch" if torch_int8_supported(out_features, in_features) else "dense"


def int4_layout(out_features: int, in_features: int, group_size: int, dtype: torch.dtype) -> str:
    """How an int4 weight is packed here: ``"zlocal"`` (``cpu_kernels``' layout, when its kernel
    runs on this CPU and fits the shape; it takes bf16 activations) or ``"torch"``
    (``_convert_weight_to_int4pack_for_cpu``)."""
    if dtype != torch.bfloat16 or not cpu_kernels.supports_int4(out_features, in_features, group_size):
        return "torch"
    if cpu_kernels.kernels():
        return "zlocal"
    return "torch"


def _check_layout(layout: str | None, best: str, runs: dict[str, bool], what: str) -> str:
    """``layout`` if its kernel runs the layer here (None: ``best``, the best one here, provided
    its kernel runs the shape; ``runs`` says which kernels do)."""
    chosen = best if layout is None else layout
    if runs.get(chosen, False):
        return chosen
    fits = [name for name, ok in runs.items() if ok]
    raise InvalidArgumentError(
        f"layout {chosen!r} cannot run {what} here ({cpu_kernels.kernel_status()}); "
        f"use {' or '.join(map(repr, fits)) if fits else 'the compute dtype (no kernel runs this shape)'}"
    )


def _int4_layout(layout, out_f, in_f, group_size, dtype) -> str:
    what = f"a {out_f}x{in_f} {dtype} int4 layer with group size {group_size}"
    runs = {
        "zlocal": dtype == torch.bfloat16
        and cpu_kernels.supports_int4(out_f, in_f, group_size)
        and cpu_kernels.kernels() is not None,
        "torch": torch_int4_supported(out_f, in_f, group_size),
    }
    return _check_layout(layout, int4_layout(out_f, in_f, group_size, dtype), runs, what)


def _int8_layout(layout, out_f, in_f, dtype) -> str:
    runs = {
        "zlocal": dtype == torch.bfloat16
        and cpu_kernels.supports_int8(out_f, in_f)
        and cpu_kernels.kernels() is not None,
        "torch": torch_int8_supported(out_f, in_f),
        "dense": True,
    }
    best = int8_layout(out_f, in_f, dtype)
    return _check_layout(layout, best, runs, f"a {out_f}x{in_f} {dtype} int8 layer")


class Int8WeightOnlyLinear(_QuantLinearBase):
    """y = x @ (q * scale).T (+ bias) with per-channel int8 weights: on zlocal's own kernel where it
    runs (``cpu_kernels``: AVX-512 BF16, bf16 activations; the codes are then stored in its tiles),
    else ``_weight_int8pack_mm`` where it computes the shape correctly, else a matmul on the codes
    (``dense``). bf16 prompts of ``DEQUANT_GEMM_MIN_TOKENS`` tokens or more on CPUs with native bf16
    GEMMs go through ``int8_matmul_blockwise``."""

    bits = 8

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype=torch.bfloat16,
        layout: str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self._use_layout(_int8_layout(layout, out_features, in_features, dtype))
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        """Row-major int8 codes [out, in] -> this module's ``weight`` layout."""
        return cpu_kernels.pack_int8(q) if self.layout == "zlocal" else q.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._prepare(x)
        ours = self.layout == "zlocal"
        if x2.shape[0] > 1 and _blockwise(x2, DEQUANT_GEMM_MIN_TOKENS, self.dtype):
            y = int8_matmul_blockwise(x2, self.weight, self.scales, ours)
        elif ours:
            y = self._kernel.int8_mm(x2, self.weight, self.scales)
        elif self.layout == "torch":
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales)
        else:  # codes are exact in bf16 and fp32; the scale goes on the sums
            y = F.linear(x2, self.weight.to(x2.dtype)).mul_(self.scales)
        return self._finish(y, x.shape, x.dtype)


class Int4WeightOnlyLinear(_QuantLinearBase):
    """Group-wise asymmetric int4 weights. Where zlocal's own kernel runs (``cpu_kernels``: AVX-512
    BF16, bf16 activations) they are packed in its layout; otherwise for torch's
    ``_weight_int4pack_mm_for_cpu``. bf16 prompts of ``int4_blockwise_min_tokens`` tokens or more
    on CPUs with native bf16 GEMMs go through ``int4_matmul_blockwise``."""

    bits = 4
    torch_row_block = max(INT4_PACK_BLOCKS)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype=torch.bfloat16,
        group_size: int = 128,
        layout: str | None = None,
        codes: torch.Tensor | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.group_size = group_size
        # Only zlocal's kernels read a code table; torch's int4 kernels know the integers 0..15.
        self._use_layout(
            _int4_layout(
                "zlocal" if codes is not None else layout, out_features, in_features, group_size, dtype
            )
        )
        # the values codes 0..15 stand for (cpu_kernels.code_table); None: the integers themselves
        table = None if codes is None else cpu_kernels.code_table(codes)
        self.register_buffer("codes", table, persistent=False)
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        groups = in_features // group_size
        if self.layout == "zlocal":
            shape = (out_features // cpu_kernels.TILE_ROWS, groups, cpu_kernels.TILE_ROWS, 2)
        else:
            shape = (groups, out_features, 2)
        self.register_buffer("scales_and_zeros", torch.empty(*shape, dtype=dtype))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self._prepare(x)
        ours = self.layout == "zlocal"
        tokens = x2.shape[0]  # one token (decode) skips the prompt-path checks
        if tokens > 1 and _blockwise(x2, int4_blockwise_min_tokens(self.layout, self.group_size), self.dtype):
            block = None if ours else int4_pack_block()
            if ours or (block and self.out_features % block == 0):
                y = int4_matmul_blockwise(
                    x2, self.weight, self.scales_and_zeros, self.group_size, block, self.codes
                )
                return self._finish(y, x.shape, x.dtype)
        if ours:
            y = self._kernel.int4_mm(x2, self.weight, self.scales_and_zeros, self.group_size, self.codes)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, self.scales_and_zeros)
        return self._finish(y, x.shape, x.dtype)

    def extra_repr(self) -> str:
        table = "" if self.codes is None else ", code table"
        return super().extra_repr() + f", group_size={self.group_size}{table}"


def same_codes(a: nn.Module, b: nn.Module) -> bool:
    """Whether two int4 modules' codes stand for the same values (their code tables, if any)."""
    ta, tb = getattr(a, "codes", None), getattr(b, "codes", None)
    return (ta is None and tb is None) or (ta is not None and tb is not None and torch.equal(ta, tb))


def quantized_tensors(
    weight: torch.Tensor, bits: int, dtype: torch.dtype, group_size: int = 128, layout: str | None = None
) -> dict:
    """Phase one for one weight: the buffers of the quantized module, ready to load (stored in
    ``layout``, by default the best one this machine runs)."""
    if bits == 8:
        q, scales = quantize_int8(weight)
        if _int8_layout(layout, weight.shape[0], weight.shape[1], dtype) == "zlocal":
            q = cpu_kernels.pack_int8(q)
        return {"weight": q, "scales": scales.to(dtype)}
    if bits == 4:
        g = int4_group_size(weight.shape[1], group_size)
        ours = _int4_layout(layout, weight.shape[0], weight.shape[1], g, dtype) == "zlocal"
        q, sz = quantize_int4(weight, g, torch.uint8 if ours else torch.int32)
        if ours:
            sz = cpu_kernels.pack_scales(sz.to(dtype))
            return {"weight": cpu_kernels.pack_int4(q), "scales_and_zeros": sz}
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)
        return {"weight": packed, "scales_and_zeros": sz.to(dtype)}
    raise InvalidArgumentError(f"CPU weight-only kernels support 4 or 8 bits, not {bits}")


def empty_quant_linear(
    in_features: int,
    out_features: int,
    bias: bool,
    *,
    bits: int,
    dtype: torch.dtype,
    group_size: int = 128,
    layout: str | None = None,
) -> _QuantLinearBase:
    """An unfilled quantized module of the right shape (phase two: the swap)."""
    if bits == 8:
        return Int8WeightOnlyLinear(in_features, out_features, bias, dtype, layout)
    return Int4WeightOnlyLinear(
        in_features, out_features, bias, dtype, int4_group_size(in_features, group_size), layout
    )


def quantize_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    dtype: torch.dtype,
    group_size: int = 128,
    layout: str | None = None,
) -> _QuantLinearBase:
    """Quantize one weight (out, in) and return the filled CPU module (``layout``: see
    ``quantized_tensors``)."""
    out_f, in_f = weight.shape
    module = empty_quant_linear(
        in_f, out_f, bias is not None, bits=bits, dtype=dtype, group_size=group_size, layout=layout
    )
    state = quantized_tensors(weight, bits, dtype, group_size, layout)
    if bias is not None:
        state["bias"] = bias.detach().to(dtype)
    module.load_state_dict(state, assign=True)
    return module


def dequantized_weight(module: nn.Module) -> torch.Tensor | None:
    """The [out, in] float32 weight a CPU linear module multiplies by (its codes times its scales, in
    whichever layout it stores them), or None for a module this does not know. For references and
    checks: it allocates the whole float weight."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    if isinstance(module, Int8WeightOnlyLinear):
        q = module.weight
        if module.layout == "zlocal":
            q = torch.empty_like(module.weight)
            cpu_kernels.unpack_int8(q, module.weight)
        return q.float() * module.scales.float()[:, None]
    if isinstance(module, Int4WeightOnlyLinear):
        codes = torch.empty(module.out_features, module.in_features, dtype=torch.int32)
        if module.layout == "zlocal":
            cpu_kernels.unpack_int4(codes, module.weight)
            sz = cpu_kernels.scales_by_row(module.scales_and_zeros).transpose(0, 1)
        elif (block := int4_pack_block()) and module.out_features % block == 0:
            _unpack_int4(codes, module.weight, block)
            sz = module.scales_and_zeros
        else:  # torch's packing of a partial block is undocumented: read the weight back through its kernel
            eye = torch.eye(module.in_features)
            sz = module.scales_and_zeros.float()
            w_t = torch._weight_int4pack_mm_for_cpu(eye, module.weight, module.group_size, sz)
            return w_t.t().contiguous()
        return cpu_kernels.dequantize_int4(codes, sz, module.group_size, module.codes)
    return None


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fallback_note(
    linear_shapes: list[tuple[int, int]], bits: int, dtype: torch.dtype, group_size: int
) -> str | None:
    """A plan line naming the decoder projections (in ``ModelShape.linear_shapes`` order) that no
    weight-only kernel runs here, and what runs them instead; None when every one has a kernel."""
    slow = {}
    for name, shape in zip(_PROJECTIONS, linear_shapes, strict=True):
        kind = kernel_for(shape, bits, dtype, group_size)
        if kind in ("dense", "unquantized"):
            slow.setdefault(kind, []).append(f"{name} {shape[0]}x{shape[1]}")
    how = {
        "dense": "int8 codes multiplied as a plain matmul (no kernel computes these widths correctly)",
        "unquantized": f"kept in {str(dtype).replace('torch.', '')} (no int{bits} kernel takes the shape)",
    }
    parts = [f"{', '.join(names)}: {how[kind]}" for kind, names in slow.items()]
    return f"CPU kernel fallbacks: {'; '.join(parts)}" if parts else None
