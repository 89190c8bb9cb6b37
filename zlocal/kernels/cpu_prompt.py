"""Prompt processing for the CPU int8/int4 layers: many tokens at once run faster as oneDNN's bf16 GEMM
on a block of weight rows converted into a small scratch than through the weight-only kernels, which
convert weights inside every multiply-add. ``cpu_quant``'s modules call these past the thresholds
below."""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

from zlocal.errors import InvalidArgumentError
from zlocal.kernels import cpu_kernels

# innerKTiles of the CPU int4 packing (torch._convert_weight_to_int4pack_for_cpu)
INNER_K_TILES = 8

# Prompt processing: the weight-only kernels convert weights inside every multiply-add, so with many
# tokens they are compute-bound (Mistral-7B gate/up, 128 tokens: int8 255 ms on a 2-core AMD EPYC VM).
# Converting a block of rows into a small bf16 scratch and running oneDNN's bf16 GEMM on it is faster:
# int8 2-3x from 32 tokens (86 ms; the codes are exact in bf16, the scale is applied to the sums);
# int4 from 256 tokens, where unpacking the nibbles costs less than the GEMM saves (gate/up, 512
# tokens: 401 vs 700 ms; at 128 both take 175 ms).
# int8 at 16 tokens: close (gate/up: kernel 30, block-wise 23 ms; 576-wide SmolLM2 ones tie); at 8 the
# kernel wins (15 vs 18 ms).
DEQUANT_GEMM_MIN_TOKENS = 32
INT4_DEQUANT_GEMM_MIN_TOKENS = 256
# In zlocal's layout the block-wise path dequantizes with one vectorized C pass (cpu_kernels), so the
# GEMM is most of its time; zlocal's int4 kernel decodes each chunk once per 4 tokens, less well with
# small groups (one scaling per group and token). Measured crossovers on the same VM: group 32 ~20-24
# tokens, 64 ~30-55, 128 ~70-96 (SmolLM2's and the 7B's shapes).
ZLOCAL_INT4_DEQUANT_GEMM_MIN_TOKENS = {32: 24, 64: 48}  # larger groups: 96


def int4_blockwise_min_tokens(layout: str, group_size: int) -> int:
    """Prompt length from which an int4 layer runs block-wise on oneDNN's GEMM."""
    if layout != "zlocal":
        return INT4_DEQUANT_GEMM_MIN_TOKENS
    return ZLOCAL_INT4_DEQUANT_GEMM_MIN_TOKENS.get(group_size, 96)

# Output rows per block of torch's CPU int4 packing: 64 with AVX-512, 32 with AVX2.
INT4_PACK_BLOCKS = (64, 32)
_SCRATCH_ELEMS = 1 << 22  # 8 MB of bf16: one block stays in cache between its conversion and GEMM
_scratch = threading.local()  # one scratch per thread: two runtimes may prefill at once


def bf16_gemm_is_fast() -> bool:
    """Whether this CPU runs bf16 GEMMs natively in oneDNN (AVX-512 bf16 or AMX), which the
    block-wise prompt paths need to beat the weight-only kernels."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


_BF16_GEMM = bf16_gemm_is_fast()


def _blockwise(x2: torch.Tensor, min_tokens: int, dtype: torch.dtype) -> bool:
    """Whether a prompt of ``x2.shape[0]`` tokens takes the block-wise bf16 GEMM path."""
    return x2.shape[0] >= min_tokens and dtype == torch.bfloat16 and _BF16_GEMM


def _scratch_rows(out_f: int, in_f: int) -> tuple[int, torch.Tensor]:
    """Rows per block (a multiple of 64) and this thread's bf16 scratch, big enough for one block."""
    rows = max(64, _SCRATCH_ELEMS // in_f // 64 * 64)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < rows * in_f:
        # a normal tensor, not an inference one: it is rewritten in and outside inference mode
        with torch.inference_mode(False):
            buf = _scratch.buf = torch.empty(rows * in_f, dtype=torch.bfloat16)
    return rows, buf


def int8_matmul_blockwise(
    x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, tiled: bool = False
) -> torch.Tensor:
    """``x @ (q * scales).T`` for many rows of ``x`` (bf16), a block of weight rows at a time
    (``tiled``: ``q`` is in ``cpu_kernels.pack_int8``'s layout)."""
    out_f, in_f = q.shape
    rows, buf = _scratch_rows(out_f, in_f)
    parts = []
    for start in range(0, out_f, rows):
        block = q[start : start + rows]
        w = buf[: block.numel()].view(block.shape)
        if tiled:
            cpu_kernels.unpack_int8(w, block)
        else:
            w.copy_(block)
        parts.append(F.linear(x, w))
    return torch.cat(parts, dim=-1).mul_(scales)


def _unpack_int4(out: torch.Tensor, packed: torch.Tensor, block: int) -> None:
    """Write the 0..15 codes of ``packed`` rows ([R, K/2] uint8, torch's CPU int4 layout) into
    ``out`` [R, K]: each block of ``block`` rows is stored as [K, block/2] bytes, the low nibble
    holding row j and the high nibble row j + block/2."""
    r, k = out.shape
    v = packed.view(r // block, k, block // 2)
    o = out.view(r // block, block, k)
    o[:, : block // 2].copy_((v & 15).transpose(1, 2))
    o[:, block // 2 :].copy_((v >> 4).transpose(1, 2))


@functools.cache
def int4_pack_block() -> int | None:
    """Rows per block of torch's CPU int4 packing on this CPU (64 with AVX-512, 32 with AVX2), found
    once by packing known codes and reading them back; None when neither layout matches."""
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=gen)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES)
    for block in INT4_PACK_BLOCKS:
        out = torch.empty_like(codes)
        _unpack_int4(out, packed, block)
        if torch.equal(out, codes):
            return block
    return None


def int4_matmul_blockwise(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group_size: int,
    block: int | None,
    codes: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` (bf16) times the int4 weight (``(q - 8) * scale + zero`` per group), block-wise.
    ``block`` is the row block of torch's layout, or None for ``cpu_kernels``' layout (whose
    ``codes`` table, if any, gives the value of each code)."""
    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    rows, buf = _scratch_rows(out_f, in_f)
    # zlocal's layout exists only where its kernels run: they dequantize a block in one C pass
    kernel = cpu_kernels.kernels() if block is None else None
    if codes is not None and kernel is None:  # torch's path knows only the integer codes 0..15
        raise InvalidArgumentError("an int4 code table needs zlocal's CPU kernels")
    if kernel is None:
        scales, zeros = scales_and_zeros[..., 0].t(), scales_and_zeros[..., 1].t()  # [out, groups]
    parts = []
    for start in range(0, out_f, rows):
        n = min(rows, out_f - start)
        w = buf[: n * in_f].view(n, in_f)
        if kernel is not None:  # rows are whole tiles (blocks are multiples of 64 rows)
            tiles = slice(start // cpu_kernels.TILE_ROWS, (start + n) // cpu_kernels.TILE_ROWS)
            kernel.int4_dequantize(w, packed[start : start + n], scales_and_zeros[tiles], group_size, codes)
        else:
            _unpack_int4(w, packed[start : start + n], block)
            groups = w.view(n, in_f // group_size, group_size)
            groups.sub_(8).mul_(scales[start : start + n, :, None]).add_(zeros[start : start + n, :, None])
        parts.append(F.linear(x, w))
    return torch.cat(parts, dim=-1)
