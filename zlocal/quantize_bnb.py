"""Streaming bitsandbytes quantization (nf4 / fp4 / int8) of a safetensors checkpoint.

Tensors are read one at a time from memory-mapped source shards, quantized, and written out in
bounded output shards, so peak memory is about one output shard plus the largest tensor, not the
model. The output uses exactly the tensor names, dtypes and config that
``transformers`` writes for a bitsandbytes model, so ``AutoModelForCausalLM.from_pretrained(OUT)``
loads it without zlocal.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError, ConversionError, DependencyError
from .formats import convert_format, convert_methods
from .formats.bnb import BLOCKSIZE_4BIT

BNB_METHODS = convert_methods("bitsandbytes")  # method -> bits
DEFAULT_MAX_SHARD_BYTES = 512 << 20  # small output shards bound the write buffer (and its serialization copy)

ST_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_ITEMSIZE = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F64": 8,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}

# Linear layers inside decoder blocks are quantized; embeddings, lm_head and norms stay as they are
# (transformers' bitsandbytes quantizer keeps the output embedding unquantized too).
_LINEAR_RE = re.compile(r"^model\.layers\.\d+\..*\.weight$")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a source shard, located by its byte range inside the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse and check a safetensors header without reading tensor data.

    Raises CheckpointError naming the file when the header is malformed, when an offset points past
    the end of the file (a truncated download) or a tensor's byte size disagrees with its shape.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path.name}: file is too short to be safetensors (truncated?)")
        hlen = int.from_bytes(raw, "little")
        if hlen <= 0 or hlen > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path.name}: corrupt safetensors header length {hlen} (file size {size})")
        try:
            header = json.loads(f.read(hlen))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"{path.name}: safetensors header is not valid JSON (corrupt file)"
            ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + hlen
    entries: dict[str, TensorEntry] = {}
    data_end = 0
    for name, info in header.items():
        try:
            dtype, shape, (lo, hi) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path.name}: tensor {name} has a malformed header entry") from exc
        if dtype not in ST_ITEMSIZE:
            raise CheckpointError(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
        numel = 1
        for d in shape:
            if d < 0:
                raise CheckpointError(f"{path.name}: tensor {name} has a negative dimension {shape}")
            numel *= d
        if not (0 <= lo <= hi) or hi - lo != numel * ST_ITEMSIZE[dtype]:
            raise CheckpointError(
                f"{path.name}: tensor {name} byte range {lo}..{hi} does not match shape {list(shape)} {dtype}"
            )
        if base + hi > size:
            raise CheckpointError(
                f"{path.name}: tensor {name} ends at byte {base + hi} but the file has {size} bytes "
                "(truncated download?); download the shard again"
            )
        data_end = max(data_end, hi)
        entries[name] = TensorEntry(name, dtype, shape, base + lo, base + hi)
    if base + data_end != size:
        raise CheckpointError(
            f"{path.name}: file has {size - base - data_end} bytes beyond its last tensor (corrupt shard)"
        )
    return entries, meta


class MappedShard:
    """A read-only memory map of one safetensors file that hands out tensors one at a time.

    After each tensor is used, its pages are dropped with MADV_DONTNEED so the resident set stays
    near one tensor even though the whole shard is mapped.
    """

    def __init__(self, path: Path, entries: dict[str, TensorEntry]):
        self.path = path
        self.entries = entries
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else None

    def tensor(self, name: str) -> torch.Tensor:
        """Copy the named tensor out of the map (the copy is owned memory, freed by the caller)."""
        e = self.entries[name]
        dtype = ST_DTYPES[e.dtype]
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer warning; we copy right away
            view = torch.frombuffer(self._mm, dtype=torch.uint8, count=e.nbytes, offset=e.start)
        out = view.clone().view(dtype).reshape(e.shape)
        del view
        self.release(e)
        return out

    def release(self, e: TensorEntry) -> None:
        """Drop the mapped pages of one tensor from this process's resident set."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo = (e.start // page) * page
        with contextlib.suppress(OSError, ValueError):  # advisory only
            self._mm.madvise(mmap.MADV_DONTNEED, lo, e.end - lo)

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
        self._file.close()


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


class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever the buffer exceeds ``max_bytes``."""

    def __init__(self, out_dir: Path, max_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir = out_dir
        self.max_bytes = max_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.parts: list[tuple[str, list[str]]] = []  # temp file name, tensor names
        self.total_size = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.buffer[k] = v
            n = v.numel() * v.element_size()
            self.buffered += n
            self.total_size += n
        if self.buffered >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"part-{len(self.parts):05d}.safetensors.tmp"
        write_safetensors(self.out_dir / name, self.buffer, {"format": "pt"})
        self.parts.append((name, list(self.buffer)))
        self.buffer, self.buffered = {}, 0

    def finish(self) -> list[str]:
        """Flush, give shards their final HF names, write the index; return the shard file names."""
        self.flush()
        n = len(self.parts)
        names = []
        weight_map = {}
        for i, (tmp, keys) in enumerate(self.parts):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / tmp, self.out_dir / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            names.append("model.safetensors.index.json")
        return names


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file tensor by tensor from the tensors' own memory.

    ``safetensors.torch.save_file`` first copies every tensor into a bytes object, doubling the
    memory of the shard being written; writing the header and then each tensor's buffer avoids it.
    """
    header: dict = {"__metadata__": metadata}
    offset = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        header[k] = {
            "dtype": _ST_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format aligns tensor data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))


def iter_source(
    shards: list[tuple[Path, dict[str, TensorEntry]]],
) -> Iterator[tuple[MappedShard, TensorEntry]]:
    """Yield every tensor entry shard by shard, keeping one shard mapped at a time."""
    for path, entries in shards:
        shard = MappedShard(path, entries)
        try:
            for e in sorted(entries.values(), key=lambda x: x.start):
                yield shard, e
        finally:
            shard.close()


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


def dtype_name(dtype: torch.dtype) -> str:
    """Safetensors spelling of a torch dtype (for messages)."""
    return _ST_NAMES.get(dtype, str(dtype))


class ByteProgress:
    """tqdm over bytes with the tensor count as a postfix; ETA comes from the byte rate.

    ``with ByteProgress(...) as tick`` gives the callback ``quantize_bnb`` calls per tensor."""

    def __init__(self, total_bytes: int, total_tensors: int, desc: str, quiet: bool):
        self.total_bytes, self.total_tensors, self.desc, self.quiet = total_bytes, total_tensors, desc, quiet
        self.done = 0

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

        return tick

    def __exit__(self, *exc):
        self.bar.close()
        return False
