"""The Runtime's streams: one generation each, holding the runtime's lock while it runs.

Lock protocol (what ``Runtime`` documents):

* A stream takes the runtime lock on its first ``next()``, not when it is created, and gives it
  back as soon as it yields its last response (the one with ``finish_reason``), or on ``close()``,
  or when the stream object is garbage (``__del__``; the runtime keeps only a weak reference).
* A stream that is *paused* (no thread inside its ``next()``) while holding the lock is ended by
  the next *waiting* request on the runtime when it is evidently abandoned: that request comes
  from the thread that last advanced it (that thread is here, so it is not consuming it, and
  waiting would deadlock), that thread has exited, or ``Runtime.cancel()`` was issued after the
  stream was created. Its next ``next()`` then returns one response with finish_reason
  "cancelled" and the stream ends. ``wait=False`` only probes: it gets BusyError and ends
  nothing. A paused stream of another live thread counts as a generation in progress: other
  threads wait for it (``wait=False`` / ``timeout=`` give BusyError instead).
* ``Runtime.cancel()`` ends every stream created before the call: the running one within a token,
  and one not started yet at once (finish_reason "cancelled", no prefill).
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from zlocal.errors import BusyError, RuntimeClosedError
from zlocal.inference.engine import GenerationResponse
from zlocal.kernels.heap import release_freed_memory

if TYPE_CHECKING:
    from zlocal.inference.runtime import Runtime

# How often a request waiting for the runtime re-checks whether the stream holding it was abandoned
# (its thread exited, or it was cancelled while paused); a release wakes the waiter at once anyway.
_RECHECK_S = 0.1


class Closed:
    """Stands in for a closed Runtime's model, engine, tokenizer and template: any use says to load again."""

    def __getattr__(self, name: str):
        raise RuntimeClosedError(CLOSED_MSG)


CLOSED_MSG = "this Runtime was closed and its weights freed; load the model again with zlocal.load(...)"
CLOSED = Closed()


def no_stream() -> None:
    """The lock holder when no stream holds the lock (same call shape as a weak reference)."""
    return None


def forget_model(model) -> None:
    """Drop the process-wide references to ``model`` (the prepared decoder is keyed by it)."""
    from zlocal.inference.prepare import _PREPARED

    _PREPARED.pop(model, None)
    # The block-wise prompt kernels keep one bf16 scratch per thread (up to ~8 MB): drop this
    # thread's. Another thread's goes with that thread (asyncio workers end with their stream).
    prompt_kernels = sys.modules.get("zlocal.kernels.cpu_prompt")
    if prompt_kernels is not None:
        prompt_kernels._scratch.__dict__.pop("buf", None)


def return_memory() -> None:
    """Collect the freed model's cycles and hand freed heap pages back to the OS (glibc)."""
    gc.collect()
    release_freed_memory()


class StreamCancel:
    """The stop condition a stream's engine loop polls: the caller's event, a ``Runtime.cancel()``
    issued after the stream was created, or preemption of the paused stream."""

    def __init__(self, runtime: Runtime, event: threading.Event | None):
        self.runtime = runtime
        self.epoch = runtime._cancel_epoch
        self.event = event
        self.preempted = False

    def by_runtime(self) -> bool:
        """Cancelled by ``Runtime.cancel()`` or preemption (never polls the caller's event)."""
        return self.preempted or self.runtime._cancel_epoch != self.epoch

    def is_set(self) -> bool:
        # The caller's event is polled exactly once per check: the server counts the polls.
        user = self.event.is_set() if self.event is not None else False
        return user or self.by_runtime()


class GenerationStream(Iterator[GenerationResponse]):
    """An iterator of GenerationResponse for one generation (see the module docstring for the lock)."""

    def __init__(self, runtime: Runtime, prompt_ids, params, cancel, wait, timeout, constraint=None):
        self._rt = runtime
        self._prompt_ids = prompt_ids
        self._params = params
        self._cancel = StreamCancel(runtime, cancel)
        self._wait, self._timeout = wait, timeout
        self._constraint = constraint
        self._gen: Iterator[GenerationResponse] | None = None
        self._step = threading.Lock()  # held while a thread is inside __next__
        self._owner = threading.current_thread()
        self._holds_lock = False
        self._done = False
        self._ended = False  # the last response (with finish_reason) was returned
        self._last: GenerationResponse | None = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> GenerationResponse:
        with self._step:
            self._owner = threading.current_thread()
            if self._done:
                return self._end_response()
            if self._gen is None and not self._start():
                return self._end_response()
            try:
                r = next(self._gen)
            except BaseException:
                self._finish()
                raise
            self._last = r
            if r.finish_reason is not None:
                self._ended = True
                self._finish()  # give the runtime back now, not when the caller asks once more
            return r

    def _start(self) -> bool:
        """Take the runtime and start the engine; False when cancelled before it started."""
        if self._cancel.is_set():
            self._done = True
            return False
        self._rt._acquire(self, self._wait, self._timeout)
        self._holds_lock = True
        if self._cancel.is_set():  # cancelled (or the runtime closed) while it waited for the lock
            self._finish()
            return False
        threads = self._rt.threads
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)  # another runtime in this process may have changed it
        self._gen = self._rt.engine.generate(self._prompt_ids, self._params, self._cancel, self._constraint)
        return True

    def _end_response(self) -> GenerationResponse:
        """After preemption or an early cancel: one last response with finish_reason "cancelled"."""
        if self._ended:
            raise StopIteration
        self._ended = True
        last = self._last
        return GenerationResponse(
            text="",
            token=None,
            prompt_tokens=len(self._prompt_ids),
            generation_tokens=last.generation_tokens if last else 0,
            reused_tokens=last.reused_tokens if last else 0,
            prompt_tps=last.prompt_tps if last else 0.0,
            generation_tps=last.generation_tps if last else 0.0,
            time_to_first_token=last.time_to_first_token if last else 0.0,
            finish_reason="cancelled",
        )

    def _finish(self) -> None:
        self._done = True
        gen, self._gen = self._gen, None
        try:
            if gen is not None:
                gen.close()
        finally:
            if self._holds_lock:
                self._holds_lock = False
                self._rt._release(self)

    def close(self) -> None:
        """Stop the generation and give the runtime back (the stream then ends)."""
        with self._step:
            self._ended = True
            self._finish()

    def __del__(self):
        if getattr(self, "_holds_lock", False):  # dropped half-consumed: give the runtime back
            self._ended = True
            self._finish()

    # -- used by Runtime._acquire ---------------------------------------------------------------------
    def owned_here(self) -> bool:
        """Whether the calling thread is the one that last advanced this stream."""
        return self._owner is threading.current_thread()

    def abandoned(self) -> bool:
        """Whether a new request may end this (lock-holding) stream: see the module docstring."""
        owner = self._owner
        return owner is threading.current_thread() or not owner.is_alive() or self._cancel.by_runtime()

    def preempt(self) -> bool:
        """End this stream if it is paused (no thread inside next()); True when it gave the lock back
        (False when it holds none: a waiter must then wait, not spin)."""
        if not self._holds_lock or not self._step.acquire(blocking=False):
            return False
        try:
            self._cancel.preempted = True
            self._finish()
            return True
        finally:
            self._step.release()


def acquire(lock: threading.Lock, holder, wait: bool, timeout: float | None) -> None:
    """Take ``lock`` for a new generation; BusyError when ``wait`` is False or ``timeout`` runs out.

    A waiting request ends an abandoned paused stream ``holder()`` holds the lock with (waiting for
    it would never end); ``wait=False`` only probes and never ends another stream.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while not lock.acquire(blocking=False):
        stream = holder()
        if wait and stream is not None and stream.abandoned() and stream.preempt():
            continue
        left = None if deadline is None else deadline - time.monotonic()
        if not wait or (left is not None and left <= 0):
            if stream is not None and stream.owned_here():
                raise BusyError(
                    "a stream this thread left half-consumed holds the runtime; close() it or iterate "
                    "it to the end (a request that waits ends it)"
                )
            raise BusyError("another generation is running on this runtime; wait for it or cancel it")
        if lock.acquire(timeout=_RECHECK_S if left is None else min(_RECHECK_S, left)):
            return
