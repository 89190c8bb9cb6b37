"""``zlocal serve --keep-alive SECONDS``: unload the model when idle, load it again on demand.

``KeepAliveRuntime`` stands where the server expects a Runtime. A watcher thread closes the
runtime (``Runtime.close()``: weights, KV cache and kernel scratch freed) once no request has used
it for ``keep_alive`` seconds; the next use loads it again, and that request waits for the load
(it runs on the generation or prep thread, never on the event loop). What /v1/models shows
(``max_context``) and the sampling defaults are kept, so listing models never loads anything.
Every use goes through ``using()``, which counts users: the watcher never closes a runtime in use.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("zlocal.serving.server")


class KeepAliveRuntime:
    """A Runtime proxy that frees the model after ``keep_alive`` idle seconds (see the module docstring)."""

    def __init__(self, load: Callable[[], Any], keep_alive: float, runtime: Any = None):
        self._load = load
        self.keep_alive = float(keep_alive)
        self._lock = threading.Lock()
        self._rt = runtime if runtime is not None else load()
        self.max_context = self._rt.max_context
        self.sampling_defaults = self._rt.sampling_defaults
        self.loads, self.unloads = 1, 0
        self._users = 0
        self._last_used = time.monotonic()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="zlocal-keep-alive", daemon=True)
        self._watcher.start()

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory now."""
        return self._rt is not None

    def residency(self) -> dict[str, Any]:
        """Load state for /stats."""
        return {
            "loaded": self.loaded,
            "keep_alive_s": self.keep_alive,
            "loads": self.loads,
            "unloads": self.unloads,
        }

    @contextlib.contextmanager
    def using(self) -> Iterator[Any]:
        """The loaded runtime (loaded first if it was unloaded), not unloaded until the block ends."""
        with self._lock:
            if self._rt is None:
                t0 = time.monotonic()
                self._rt = self._load()
                self.loads += 1
                took = time.monotonic() - t0
                log.info("model reloaded in %.1f s (it was unloaded after --keep-alive)", took)
            self._users += 1
            rt = self._rt
        try:
            yield rt
        finally:
            with self._lock:
                self._users -= 1
                self._last_used = time.monotonic()

    def stream_tokens(self, prompt_ids, **kwargs):
        """``Runtime.stream_tokens``, holding the runtime loaded until the stream ends."""
        with self.using() as rt:
            yield from rt.stream_tokens(prompt_ids, **kwargs)

    def __getattr__(self, name: str):
        # Anything else the server uses (encode, plan_chat, tokenizer, grammars, ...) from the
        # loaded runtime; methods keep it loaded while they run.
        if name.startswith("__"):  # copy/pickle probes must not load a model
            raise AttributeError(name)
        with self.using() as rt:
            value = getattr(rt, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def call(*args, **kwargs):
            with self.using() as live:
                return getattr(live, name)(*args, **kwargs)

        return call

    def _idle_for(self) -> float:
        return time.monotonic() - self._last_used

    def _watch(self) -> None:
        period = min(max(self.keep_alive / 4, 0.05), 5.0)
        while not self._stop.wait(period):
            with self._lock:
                rt = self._rt
                if rt is None or self._users or rt.busy or self._idle_for() < self.keep_alive:
                    continue
                self._rt = None
                self.unloads += 1
                idle = self.keep_alive
                rt.close()
            log.info("model unloaded after %g s idle (--keep-alive); the next request loads it", idle)

    def close(self) -> None:
        """Stop the watcher and free the model."""
        self._stop.set()
        with self._lock:
            rt, self._rt = self._rt, None
        if rt is not None:
            rt.close()
