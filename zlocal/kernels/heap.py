"""Giving freed C-heap memory back to the OS.

glibc keeps freed blocks in its arenas (one per thread that allocated) and raises its mmap threshold
after big frees, so tensors freed while loading, a model freed by ``Runtime.close()``, or a large
request body stay in the resident set unless asked back with ``malloc_trim``. Elsewhere (musl,
macOS) there is no such call: the memory is free for reuse, just not returned.
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def release_freed_memory() -> bool:
    """Hand the heap pages freed so far back to the OS (glibc's ``malloc_trim(0)``); False where the
    C library has no such call."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
