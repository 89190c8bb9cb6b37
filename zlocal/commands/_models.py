"""The models on this machine, for `zlocal list` and `zlocal rm`: the Hugging Face cache, zlocal's own
model cache and the prepared forms. Reads config.json files only (no torch, no transformers)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zlocal.checkpoint.embedded import EMBEDDED_DIRNAME
from zlocal.paths import cache_dir


@dataclass
class ModelEntry:
    """One model found on disk, and the prepared forms made from it."""

    name: str
    where: str  # "hf-cache" or "zlocal"
    path: str
    format: str
    bits: int | None
    size_bytes: int
    prepared: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def weights_format(config_path: Path) -> tuple[str, int | None]:
    """(format name, bits) from a checkpoint's config.json: its quantization_config, else its dtype."""
    from zlocal.errors import ZlocalError
    from zlocal.formats.registry import checkpoint_format, get_format, source_format

    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "?", None
    if not isinstance(config, dict):
        return "?", None
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc:
        fmt = checkpoint_format(qc)
        if fmt is None:
            return str(qc.get("quant_method", "?")), qc.get("bits") if isinstance(
                qc.get("bits"), int
            ) else None
        name, bits = source_format(qc)
        prefix = "bnb-" if fmt.quant_method == "bitsandbytes" and not name.startswith("bnb") else ""
        return prefix + name, bits
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "?")
    try:
        fmt = get_format(dtype)
    except ZlocalError:
        return dtype, None
    return fmt.name, fmt.bits if isinstance(getattr(fmt, "bits", None), int) else None


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def hf_cache_models() -> list[ModelEntry]:
    """Model repos in the Hugging Face cache (HF_HOME / HF_HUB_CACHE respected), newest revision's config."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except (CacheNotFound, OSError):
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        rev = max(repo.revisions, key=lambda r: r.last_modified)
        fmt, bits = weights_format(Path(rev.snapshot_path) / "config.json")
        out.append(ModelEntry(repo.repo_id, "hf-cache", str(rev.snapshot_path), fmt, bits, repo.size_on_disk))
    return out


def zlocal_models_dir() -> Path:
    return cache_dir() / "models"


def zlocal_models() -> list[ModelEntry]:
    """Checkpoints in zlocal's own cache (the converted embedded model)."""
    root = zlocal_models_dir()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and (d / "config.json").is_file():
            fmt, bits = weights_format(d / "config.json")
            name = "smollm2-135m" if d.name == EMBEDDED_DIRNAME else d.name
            out.append(ModelEntry(name, "zlocal", str(d), fmt, bits, _dir_size(d)))
    return out


def _prepared_dict(e) -> dict:
    return {"key": e.key, "format": e.format, "bits": e.bits, "size_bytes": e.size_bytes, "path": e.path}


def all_models() -> tuple[list[ModelEntry], list]:
    """(models with their prepared forms attached, prepared entries whose source is not listed)."""
    from zlocal.checkpoint.prepared_cache import list_prepared

    models = zlocal_models() + hf_cache_models()
    orphans = []
    for e in list_prepared():
        owner = next(
            (m for m in models if (e.source and Path(e.source) == Path(m.path)) or e.model == m.name), None
        )
        if owner is None:
            orphans.append(e)
        else:
            owner.prepared.append(_prepared_dict(e))
    return models, orphans


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def remove_zlocal_model(entry: ModelEntry) -> int:
    """Delete a model folder of zlocal's cache; returns the bytes freed."""
    shutil.rmtree(entry.path, ignore_errors=True)
    return entry.size_bytes
