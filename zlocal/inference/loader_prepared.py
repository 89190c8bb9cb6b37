"""The loader's side of the prepared-form cache: the key of a load, reading an entry, writing one.

A CPU load whose decoder runs on zlocal's int4/int8 modules is saved once after it succeeds
(``zlocal.inference.prepared_form``); the next load with the same key maps it instead of reading and
quantizing the checkpoint. The key is a hash of what decides the saved bytes: each source file's name,
size and modification time (hashing a 14 GB source would cost more than the load it saves), the
plan's weight decisions, the kernel build (its library name hashes the kernel sources and flags), and
the zlocal, torch, transformers and accelerate versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from zlocal.checkpoint import prepared_cache
from zlocal.progress import report

log = logging.getLogger("zlocal.prepared")
_SOURCE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".model")


def cache_enabled(cache: bool | None) -> bool:
    """``cache`` if given, else on unless ``ZLOCAL_PREPARED_CACHE=0``."""
    if cache is not None:
        return bool(cache)
    return os.environ.get("ZLOCAL_PREPARED_CACHE", "1") != "0"


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def _kernel_build() -> str:
    from zlocal.kernels import cpu_kernels

    k = cpu_kernels.kernels()
    return k.path.name if k is not None else "torch-kernels"


def _source_identity(folder: Path) -> list[list]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _SOURCE_SUFFIXES)
    return [[p.name, (st := p.stat()).st_size, st.st_mtime_ns] for p in files]


def prepared_key(resolved, lp) -> str | None:
    """The cache key of loading ``resolved`` with plan ``lp``; None for plans it does not cover
    (layers on a GPU, dense CPU formats)."""
    import zlocal

    if lp.gpu_layers or lp.cpu_format is None:
        return None
    from zlocal.formats import get_format

    if get_format(lp.cpu_format).dense:
        return None
    what = {
        "source": [str(Path(resolved.path).resolve()), _source_identity(Path(resolved.path))],
        "weights": [
            lp.cpu_format,
            lp.group_size,
            lp.compute_dtype,
            lp.head_format,
            lp.source_format,
            lp.source_bits,
        ],
        "kernels": _kernel_build(),
        # the record names modules and buffers as this transformers builds them
        "versions": [zlocal.__version__, torch.__version__, _version("transformers"), _version("accelerate")],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]


def load_cached(resolved, config, lp, key: str, progress=None):
    """``(model, note)`` from the cache entry ``key``, or None when there is none or it is unusable
    (a broken entry is removed, and the caller loads from the checkpoint)."""
    from zlocal.inference.prepared_form import load_prepared

    folder = prepared_cache.prepared_dir() / key
    if not (folder / prepared_cache.ENTRY_META).is_file():
        return None
    try:
        model, doc = load_prepared(folder, config, progress)
    except Exception as exc:  # noqa: BLE001 - any unusable entry: drop it, read the checkpoint
        log.warning("zlocal: the prepared form %s is unusable (%s); loading from %s", key, exc, resolved.name)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    with contextlib.suppress(OSError):  # a read-only cache, or an entry evicted meanwhile: still loaded
        prepared_cache.touch(folder)
    return (
        model,
        f"weights mapped from the prepared form {key} ({doc['size'] / 2**30:.2f} GiB, zlocal's cache)",
    )


def save_cached(model, resolved, lp, key: str, progress=None) -> str | None:
    """Write ``model``'s prepared form as entry ``key``; returns a plan note, or None when it was
    not written (a model it cannot record, the size cap, too little disk: logged, never raised)."""
    from zlocal.inference.prepare import prepare_decoder
    from zlocal.inference.prepared_form import NotPreparable, layout, save_prepared

    root = prepared_cache.prepared_dir()
    folder = root / key
    if folder.exists():
        return None
    try:
        lay = layout(model, prepare_decoder(model))
        size = lay.size
        root.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(root).free < size + (2 << 30):
            log.info(
                "zlocal: not caching the prepared form of %s: less than its size + 2 GiB free", resolved.name
            )
            return None
        if not prepared_cache.evict_for(size, keep=key):
            log.info("zlocal: not caching the prepared form of %s: larger than the cache cap", resolved.name)
            return None
        meta = {
            "model": resolved.name,
            "source": str(resolved.path),
            "format": lp.cpu_format,
            "bits": _bits(lp),
            "compute_dtype": _dtype_tag(lp.compute_dtype),
            "key": key,
        }
        written = save_prepared(folder, lay, meta, progress)
    except NotPreparable as exc:
        log.info("zlocal: no prepared form for %s: %s", resolved.name, exc)
        return None
    except Exception as exc:  # noqa: BLE001 - the cache is optional: never fail a finished load
        log.warning("zlocal: could not write the prepared form of %s: %s", resolved.name, exc)
        return None
    report(progress, "save", written, written, message=str(folder))
    return f"prepared form saved to zlocal's cache ({written / 2**30:.2f} GiB, key {key}); later loads map it"


def _bits(lp) -> int:
    from zlocal.formats import get_format

    return get_format(lp.cpu_format).bits


def _dtype_tag(compute_dtype: str) -> str:
    return {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}[compute_dtype]
