"""zlocal's cache of prepared (ready-to-map) model forms: listing, removing, the size cap.

Each entry is a folder ``<cache_dir>/prepared/<key>/`` holding ``prepared.json`` (what it is and
where it came from) and ``weights.bin`` (the tensors in the kernels' layout). An entry is written
to a temporary folder and renamed into place, so a half-written one is never listed or loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from zlocal.errors import InvalidArgumentError
from zlocal.paths import cache_dir

ENTRY_META = "prepared.json"
TMP_PREFIX = ".tmp-"  # an entry being written (renamed into place when complete)
_STALE_TMP_S = 6 * 3600  # older than any write: left by a process that was killed
ENTRY_WEIGHTS = "weights.bin"
DEFAULT_CAP_BYTES = 64 << 30


@dataclass(frozen=True)
class PreparedEntry:
    """One cached prepared form."""

    key: str
    path: str
    model: str  # the name the model was loaded by
    source: str  # the checkpoint folder it was prepared from
    format: str  # the plan's CPU format (int4, int8, ...)
    bits: int
    size_bytes: int
    created: float  # unix time
    last_used: float  # unix time of the last load from it


def prepared_dir() -> Path:
    """The folder holding every prepared entry: ``$ZLOCAL_PREPARED_DIR``, else ``prepared/`` in zlocal's
    cache (``$ZLOCAL_HOME``/``$XDG_CACHE_HOME`` respected)."""
    if os.environ.get("ZLOCAL_PREPARED_DIR"):
        return Path(os.environ["ZLOCAL_PREPARED_DIR"]).expanduser()
    return cache_dir() / "prepared"


def cap_bytes() -> int:
    """The cache's size cap: ``ZLOCAL_PREPARED_CACHE_MAX_GB`` (GiB, may be fractional; inf: none),
    else 64 GiB."""
    raw = os.environ.get("ZLOCAL_PREPARED_CACHE_MAX_GB")
    if not raw:
        return DEFAULT_CAP_BYTES
    try:
        gib = float(raw)
        return 1 << 62 if gib == float("inf") else int(gib * (1 << 30))  # inf: no cap
    except (ValueError, OverflowError):
        raise InvalidArgumentError(
            f"ZLOCAL_PREPARED_CACHE_MAX_GB must be a number of GiB, got {raw!r}"
        ) from None


def _entry(folder: Path) -> PreparedEntry | None:
    try:
        meta = json.loads((folder / ENTRY_META).read_text())
        weights = folder / ENTRY_WEIGHTS
        size = weights.stat().st_size
        return PreparedEntry(
            key=folder.name,
            path=str(folder),
            model=str(meta.get("model", "")),
            source=str(meta.get("source", "")),
            format=str(meta.get("format", "")),
            bits=int(meta.get("bits", 0)),
            size_bytes=size,
            created=float(meta.get("created", 0.0)),
            last_used=weights.stat().st_atime
            if not (folder / "used").exists()
            else (folder / "used").stat().st_mtime,
        )
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def list_prepared() -> list[PreparedEntry]:
    """Every complete entry, most recently used first."""
    root = prepared_dir()
    if not root.is_dir():
        return []
    entries = [e for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and (e := _entry(d))]
    return sorted(entries, key=lambda e: e.last_used, reverse=True)


def remove_prepared(key: str) -> int:
    """Delete the entry ``key`` (a full key or a unique prefix of at least 6 characters); returns
    the bytes freed. Raises InvalidArgumentError when no entry, or more than one, matches."""
    matches = [e for e in list_prepared() if e.key == key or (len(key) >= 6 and e.key.startswith(key))]
    if len(matches) != 1:
        what = "no prepared entry" if not matches else f"{len(matches)} prepared entries"
        raise InvalidArgumentError(f"{what} match {key!r}; `zlocal list` shows the keys")
    shutil.rmtree(matches[0].path, ignore_errors=True)
    return matches[0].size_bytes


def _temporaries(older_than_s: float = 0.0) -> list[Path]:
    root = prepared_dir()
    if not root.is_dir():
        return []
    now = time.time()
    out = []
    for d in root.glob(f"{TMP_PREFIX}*"):
        with contextlib.suppress(OSError):
            if d.is_dir() and now - d.stat().st_mtime >= older_than_s:
                out.append(d)
    return out


def clear_prepared() -> int:
    """Delete every entry and leftover temporary folder (nothing else in the folder); returns the
    bytes freed."""
    entries = list_prepared()
    for e in entries:
        shutil.rmtree(e.path, ignore_errors=True)
    for d in _temporaries():
        shutil.rmtree(d, ignore_errors=True)
    return sum(e.size_bytes for e in entries)


def touch(folder: Path) -> None:
    """Record a load from ``folder`` (the eviction order)."""
    with open(folder / "used", "w"):
        pass
    os.utime(folder / "used", (time.time(), time.time()))


def evict_for(incoming: int, keep: str | None = None) -> bool:
    """Remove least recently used entries until ``incoming`` more bytes fit under the cap; False when
    the new entry alone exceeds the cap (then nothing is removed and it should not be written)."""
    cap = cap_bytes()
    if incoming > cap:
        return False
    for d in _temporaries(_STALE_TMP_S):
        shutil.rmtree(d, ignore_errors=True)
    entries = [e for e in list_prepared() if e.key != keep]
    total = sum(e.size_bytes for e in entries)
    for e in sorted(entries, key=lambda e: e.last_used):
        if total + incoming <= cap:
            break
        shutil.rmtree(e.path, ignore_errors=True)
        total -= e.size_bytes
    return True
