"""Streaming bitsandbytes quantization (nf4 / fp4 / int8) of a safetensors checkpoint.

Tensors are read one at a time from memory-mapped source shards, quantized, and written out in
bounded output shards, so peak memory is about one output shard plus the largest tensor, not the
model. The output uses exactly the tensor names, dtypes and config that
``transformers`` writes for a bitsandbytes model, so ``AutoModelForCausalLM.from_pretrained(OUT)``
loads it without zlocal.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from zlocal.checkpoint.checkpoint_io import (
    DEFAULT_MAX_SHARD_BYTES,
    ST_ITEMSIZE,
    ShardWriter,
    TensorEntry,
    iter_source,
)
from zlocal.errors import ConversionError, DependencyError
from zlocal.formats import convert_format, convert_methods
from zlocal.formats.bnb import BLOCKSIZE_4BIT
from zlocal.progress import report

BNB_METHODS = convert_methods("bitsandbytes")  # method -> bits

# Linear layers inside decoder blocks are quantized; embeddings, lm_head and norms stay as they are
# (transformers' bitsandbytes quantizer keeps the output embedding unquantized too).
_LINEAR_RE = re.compile(r"^model\.layers\.\d+\..*\.weight$")


def should_quantize(name: str, shape: tuple[int, ...]) -> bool:
    """True for the 2-D weights of linear layers inside decoder blocks."""
    return len(shape) == 2 and bool(_LINEAR_RE.match(name))


# bitsandbytes (0.50.2) repacks a 4-bit weight for its AVX-512 BF16 CPU kernel on the first forward
# (functional._convert_weight_packed_for_cpu): rows go in tiles of 32 ("N must be divisible by
# block_n") and the absmax of each 64-block is reshaped to [out, in / 64], which fails ("shape
# '[64, 1]' is invalid for input of size 96") unless every block lies inside one row. CPUs without
# AVX-512 BF16 dequantize any shape, but a checkpoint must load on every CPU, so the rule is the
# kernel's. int8 has no such step: every shape tried (odd ones too) loads and runs.
CPU_4BIT_OUT_MULTIPLE = 32
CPU_4BIT_IN_MULTIPLE = BLOCKSIZE_4BIT


def cpu_loadable(method: str, out_features: int, in_features: int) -> bool:
    """Whether transformers can run a ``method`` layer of this shape on any CPU with bitsandbytes."""
    if BNB_METHODS.get(method) != 4:
        return True
    return out_features % CPU_4BIT_OUT_MULTIPLE == 0 and in_features % CPU_4BIT_IN_MULTIPLE == 0


def check_cpu_loadable(shapes: dict[str, tuple[int, ...]], method: str) -> None:
    """Refuse, before any work, a checkpoint with a layer that ``method`` would quantize into a shape
    bitsandbytes cannot run on the CPU; names the first such layer and what to do."""
    bad = [
        (name, shape)
        for name, shape in sorted(shapes.items())
        if should_quantize(name, shape) and not cpu_loadable(method, shape[0], shape[1])
    ]
    if not bad:
        return
    name, (out_f, in_f) = bad[0]
    more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
    raise ConversionError(
        f"{method}: {name} has out_features {out_f} and in_features {in_f}{more}; bitsandbytes' CPU "
        f"4-bit kernel needs out_features divisible by {CPU_4BIT_OUT_MULTIPLE} and in_features by "
        f"{CPU_4BIT_IN_MULTIPLE}, so the result would not load: use --method int8, gptq4 or gptq8"
    )


def quantize_tensor(
    name: str, w: torch.Tensor, method: str, compute_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Quantize one linear weight; return the state-dict entries transformers would save for it."""
    return convert_format(method).quantize_tensor(name, w, compute_dtype)


def bnb_quantization_config(method: str, compute_dtype: torch.dtype) -> dict:
    """The ``quantization_config`` block transformers writes for this method."""
    return convert_format(method).quantization_config(compute_dtype)


def estimate_output_bytes(entries: list[TensorEntry], method: str) -> int:
    """Bytes the quantized checkpoint will take (weights only; small files are noise)."""
    total = 0
    for e in entries:
        numel = e.nbytes // ST_ITEMSIZE[e.dtype]
        if should_quantize(e.name, e.shape):
            total += convert_format(method).stored_bytes(numel, e.shape[0])
        else:
            total += e.nbytes
    return total


def _check_bnb() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise DependencyError("bitsandbytes is not installed; run `pip install bitsandbytes`") from exc


def quantize_bnb(
    shards: list[tuple[Path, dict[str, TensorEntry]]],
    out_dir: Path,
    method: str,
    compute_dtype: torch.dtype,
    *,
    progress: Callable[[TensorEntry], None] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Quantize every tensor of ``shards`` into ``out_dir``; return the written weight file names."""
    _check_bnb()
    if method not in BNB_METHODS:
        raise ValueError(f"not a bitsandbytes method: {method}")
    writer = ShardWriter(out_dir, max_shard_bytes)
    for shard, e in iter_source(shards):
        t = shard.tensor(e.name)
        if should_quantize(e.name, e.shape):
            writer.add(quantize_tensor(e.name, t, method, compute_dtype))
        else:
            writer.add({e.name: t})
        del t
        if progress is not None:
            progress(e)
    return writer.finish()


class ByteProgress:
    """tqdm over bytes with the tensor count as a postfix; ETA comes from the byte rate.

    ``with ByteProgress(...) as tick`` gives the callback ``quantize_bnb`` calls per tensor."""

    def __init__(self, total_bytes: int, total_tensors: int, desc: str, quiet: bool, progress=None):
        self.total_bytes, self.total_tensors, self.desc, self.quiet = total_bytes, total_tensors, desc, quiet
        self.done, self.done_bytes, self.progress = 0, 0, progress

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=self.desc,
            disable=self.quiet,
            file=sys.stderr,
            dynamic_ncols=True,
        )

        def tick(entry: TensorEntry) -> None:
            self.done += 1
            self.bar.set_postfix_str(f"{self.done}/{self.total_tensors} tensors", refresh=False)
            self.bar.update(entry.nbytes)
            self.done_bytes += entry.nbytes
            report(
                self.progress,
                "convert",
                self.done_bytes,
                self.total_bytes,
                message=f"{self.done}/{self.total_tensors} tensors",
            )

        return tick

    def __exit__(self, *exc):
        self.bar.close()
        return False
