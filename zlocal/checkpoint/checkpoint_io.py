"""Reading and writing safetensors checkpoints without holding them in memory.

Readers memory-map a shard and copy out one tensor at a time, dropping its mapped pages after each
read (``MappedShard``, and ``TensorStore`` across a checkpoint's shards), so the resident set stays
near what the caller holds; ``ShardWriter`` writes size-bounded output shards. The converter, the
streamed quality report, GPTQ scale tuning and the GPTQ CPU swap all read through here.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from zlocal.errors import CheckpointError

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

    def view(self, name: str) -> torch.Tensor:
        """The named tensor as a read-only view of the map (no copy): valid until ``close``, never to
        be written or kept; ``release`` drops its pages once it has been consumed."""
        e = self.entries[name]
        dtype = ST_DTYPES[e.dtype]
        if e.nbytes == 0 or e.start % torch.empty(0, dtype=dtype).element_size():
            return self.tensor(name)  # an unaligned tensor cannot be viewed in its dtype: copied
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only buffer: the caller only reads it
            view = torch.frombuffer(self._mm, dtype=torch.uint8, count=e.nbytes, offset=e.start)
        return view.view(dtype).reshape(e.shape)

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


def dtype_name(dtype: torch.dtype) -> str:
    """Safetensors spelling of a torch dtype (for messages)."""
    return _ST_NAMES.get(dtype, str(dtype))


def checkpoint_shards(path: Path) -> list[Path]:
    from zlocal.conversion.convert import source_shards

    if not any(path.glob("*.safetensors")):
        return []
    return source_shards(path, "safetensors")


class TensorStore:
    """The tensors of a checkpoint's safetensors shards by name. Each read copies one tensor out of
    the memory map and drops its mapped pages, so the resident set stays near what the caller holds
    instead of growing to the size of every shard it has touched."""

    def __init__(self, folder: Path):
        self._where: dict[str, MappedShard] = {}
        self._shards = []
        try:
            for path in checkpoint_shards(folder):
                shard = MappedShard(path, read_header(path)[0])
                self._shards.append(shard)
                self._where.update(dict.fromkeys(shard.entries, shard))
        except BaseException:
            self.close()  # the shards opened before the bad one
            raise

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].tensor(name)

    def view(self, name: str) -> torch.Tensor:
        """The named tensor without a copy (see ``MappedShard.view``); ``release(name)`` after use."""
        return self._where[name].view(name)

    def release(self, name: str) -> None:
        """Drop the mapped pages of tensor NAME from the resident set."""
        shard = self._where[name]
        shard.release(shard.entries[name])

    def get(self, name: str) -> torch.Tensor | None:
        """The named tensor, or None when the checkpoint has none by that name."""
        return self[name] if name in self._where else None

    def entry_bytes(self, name: str) -> int:
        """The stored size of tensor NAME in bytes."""
        return self._where[name].entries[name].nbytes

    def nbytes(self) -> int:
        """The stored size of every tensor in bytes."""
        return sum(s.entries[k].nbytes for s in self._shards for k in s.entries)

    def shard_name(self, name: str) -> str:
        """The file name of the shard holding tensor NAME (for messages)."""
        return self._where[name].path.name

    def names(self, prefix: str) -> list[str]:
        """The tensor names starting with PREFIX."""
        return [k for k in self._where if k.startswith(prefix)]

    def close(self) -> None:
        for shard in self._shards:
            shard.close()
