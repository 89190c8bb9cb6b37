"""Where zlocal keeps its own files (converted embedded model, test fixtures, bench caches)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Return zlocal's cache directory: $ZLOCAL_HOME, else $XDG_CACHE_HOME/zlocal, else ~/.cache/zlocal."""
    if os.environ.get("ZLOCAL_HOME"):
        return Path(os.environ["ZLOCAL_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "zlocal"


def profiles_dir() -> Path:
    """Return the directory of hardware and model profiles shipped with the project."""
    if os.environ.get("ZLOCAL_PROFILES"):
        return Path(os.environ["ZLOCAL_PROFILES"]).expanduser()
    return Path(__file__).resolve().parent.parent / "profiles"
