"""``zlocal.json``: what a converted checkpoint is, where it came from, and the hash of every file.

``verify(OUT)`` re-hashes the files and reports any that are missing, changed or unexpected.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zlocal.errors import VerificationError

MANIFEST_NAME = "zlocal.json"
# 2: the source is recorded by name and shard hashes only (1 also kept its absolute path, which
# says nothing about the weights and leaks the converting machine's layout); both read the same.
MANIFEST_VERSION = 2
_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the output format (absent ones are skipped)."""
    from importlib import metadata

    out = {}
    for name in ["zlocal", "torch", "transformers", "safetensors", "bitsandbytes", "gptqmodel", "optimum"]:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@dataclass
class FileEntry:
    """One output file: size and sha256."""

    sha256: str
    bytes: int


@dataclass
class Manifest:
    """The conversion record stored as ``zlocal.json`` in the output directory."""

    method: str
    bits: int
    group_size: int | None
    source: dict[str, Any]  # name, repo_id, model_type, weights_format, shards {file: sha256}
    files: dict[str, FileEntry] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    quality: dict[str, Any] | None = None
    conversion: dict[str, Any] = field(default_factory=dict)  # seconds, options, group size note
    manifest_version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        files = {k: FileEntry(**v) for k, v in (d.get("files") or {}).items()}
        return cls(
            method=d["method"],
            bits=int(d["bits"]),
            group_size=d.get("group_size"),
            source=d.get("source") or {},
            files=files,
            versions=d.get("versions") or {},
            quality=d.get("quality"),
            conversion=d.get("conversion") or {},
            manifest_version=int(d.get("manifest_version", 1)),
        )


def hash_files(directory: Path) -> dict[str, FileEntry]:
    """Hash every regular file of ``directory`` except the manifest itself."""
    return {
        p.name: FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST_NAME
    }


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Hash the directory's files into ``manifest`` and write ``zlocal.json``."""
    manifest.files = hash_files(directory)
    path = directory / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(directory: Path) -> Manifest:
    """Read ``zlocal.json``; raise VerificationError when it is missing or malformed."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise VerificationError(
            f"{directory}: no {MANIFEST_NAME}; only checkpoints made by `zlocal convert` can be verified"
        )
    try:
        return Manifest.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise VerificationError(
            f"{path}: manifest is unreadable ({exc.__class__.__name__}); re-run the conversion"
        ) from exc


@dataclass
class VerifyReport:
    """Result of re-hashing a converted checkpoint."""

    path: str
    ok: bool
    checked: int
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.ok:
            return f"OK: {self.checked} files match {MANIFEST_NAME}"
        parts = []
        if self.mismatched:
            parts.append("changed: " + ", ".join(self.mismatched))
        if self.missing:
            parts.append("missing: " + ", ".join(self.missing))
        if self.unexpected:
            parts.append("not in manifest: " + ", ".join(self.unexpected))
        return "FAILED: " + "; ".join(parts)


def verify(directory: str | Path) -> VerifyReport:
    """Re-hash every file listed in the manifest; unlisted weight files count as unexpected."""
    directory = Path(directory)
    if not directory.is_dir():
        raise VerificationError(f"{directory} is not a directory")
    manifest = read_manifest(directory)
    report = VerifyReport(path=str(directory), ok=True, checked=0)
    for name, entry in sorted(manifest.files.items()):
        p = directory / name
        if "/" in name or "\\" in name or name in {"", ".", ".."} or not p.is_file():
            report.missing.append(name)
            continue
        report.checked += 1
        if p.stat().st_size != entry.bytes or sha256_file(p) != entry.sha256:
            report.mismatched.append(name)
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.name != MANIFEST_NAME and p.name not in manifest.files:
            report.unexpected.append(p.name)
    report.ok = not (report.mismatched or report.missing or report.unexpected)
    return report
