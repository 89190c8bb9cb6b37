"""A bounded FIFO queue in front of the Runtime, one worker thread, and the asyncio side (SSE).

The runtime generates one answer at a time. Requests wait here in arrival order; when
``max_queue`` requests are already waiting, ``submit`` raises QueueFullError (the server answers
429). The same budget admits every request with a body *before* it is read (``admit``): /tokenize,
/detokenize and chat requests still being parsed count as waiting, and their parsing and
tokenizing runs on one "prep" thread in arrival order, so concurrent big bodies cannot pile up
intermediate data in memory outside the queue. Each job has its own cancel event: a client that
goes away sets it, and the engine stops before the next token. Outputs travel to the request's
event loop with ``call_soon_threadsafe``; server_responses turns them into JSON or SSE.

A job may ask for ``runs`` choices (OpenAI's ``n``): the worker generates them one after another
within the job's one place in the queue, choice ``i`` with seed ``seed + i`` when a seed is given
(``choice_sampling``), so each choice is reproducible on its own and the choices differ.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from zlocal.errors import ZlocalError
from zlocal.serving.server_schema import redact

log = logging.getLogger("zlocal.serving.server")

DONE = object()  # end-of-job marker put on the job's output queue


class CountingEvent(threading.Event):
    """A cancel event that counts how often the engine polled it (once per token step), so the
    server can tell how many steps began after a cancel was requested."""

    def __init__(self):
        super().__init__()
        self.checks = 0

    def is_set(self) -> bool:
        self.checks += 1
        return super().is_set()


class Ticket:
    """An admitted request's place in the shared budget (GenerationQueue.admit); released once."""

    __slots__ = ("held",)

    def __init__(self):
        self.held = True


class QueueFullError(Exception):
    """Too many requests are already waiting for the model."""


class ShuttingDownError(Exception):
    """The server is shutting down and takes no new work."""


@dataclass
class JobError:
    """An error raised while the job ran (forwarded to the client as an error chunk / response)."""

    message: str
    kind: str  # "invalid_request_error" for ZlocalError, "server_error" otherwise
    status: int


@dataclass
class Job:
    """One generation request: prompt ids, sampling kwargs, a cancel event and an output queue."""

    prompt_ids: list[int]
    sampling: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: CountingEvent = field(default_factory=CountingEvent)
    id: int = 0
    tag: str = ""  # the completion id shown to the client
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    runs: int = 1  # choices to generate one after another (OpenAI's n)
    tokens: int = 0  # generated so far, all choices (worker thread writes, event loop reads)
    checks_at_cancel: int | None = None
    finish_reason: str | None = None

    def request_cancel(self) -> None:
        """Ask the generation to stop (idempotent); records how far it had got."""
        if self.checks_at_cancel is None:
            self.checks_at_cancel = self.cancel.checks
            self.cancel.set()

    def _put(self, item) -> None:
        # RuntimeError: the event loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)


def choice_sampling(sampling: dict[str, Any], index: int) -> dict[str, Any]:
    """Sampling kwargs of choice ``index`` of a request: seed + index when a seed is given (the
    server checked that the last one still fits the seed range)."""
    if index == 0 or sampling.get("seed") is None:
        return sampling
    return {**sampling, "seed": sampling["seed"] + index}


class GenerationQueue:
    """FIFO of jobs served by one worker thread calling ``runtime.stream_tokens``."""

    def __init__(self, runtime, max_queue: int = 16, history: int = 32):
        self.runtime = runtime
        self.max_queue = max(0, int(max_queue))
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._admitted = 0  # admitted requests not yet waiting as jobs (reading, parsing, tokenizing)
        # One thread for parsing/tokenizing: big requests take turns instead of multiplying memory.
        self._prep = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zlocal-prep")
        self.running: Job | None = None
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=history)
        self._thread = threading.Thread(target=self._work, name="zlocal-generation", daemon=True)
        self._thread.start()

    # -- producer side (event loop) ----------------------------------------------------------------
    def _check_room(self) -> None:
        """Raise unless one more request fits (caller holds the lock). One request may always
        run when nothing else is queued, even with --max-queue 0."""
        if self._closed:
            raise ShuttingDownError("the server is shutting down")
        waiting = len(self._waiting) + self._admitted
        if waiting >= self.max_queue and (self.running is not None or waiting):
            raise QueueFullError(
                f"{waiting} requests are already waiting (--max-queue {self.max_queue}); retry later"
            )

    def admit(self) -> Ticket:
        """Take a place for a request before its body is read; QueueFullError / ShuttingDownError
        when there is none. ``release`` it when done, or hand it to ``submit``."""
        with self._cond:
            self._check_room()
            self._admitted += 1
        return Ticket()

    def release(self, ticket: Ticket) -> None:
        """Give an admitted request's place back (idempotent)."""
        with self._cond:
            if ticket.held:
                ticket.held = False
                self._admitted -= 1

    async def prepare(self, fn, *args):
        """Run ``fn(*args)`` on the prep thread, after the prep work of earlier requests."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prep, self._prep_call, fn, args)

    def _prep_call(self, fn, args):
        if self._closed:  # queued before a shutdown: do not start big work now
            raise ShuttingDownError("the server is shutting down")
        return fn(*args)

    def submit(
        self,
        prompt_ids: list[int],
        sampling: dict[str, Any],
        tag: str = "",
        ticket: Ticket | None = None,
        runs: int = 1,
    ) -> Job:
        """Queue a job of ``runs`` choices; raise QueueFullError or ShuttingDownError instead of
        waiting. An admitted request's ``ticket`` becomes the job's place (it was counted already)."""
        job = Job(list(prompt_ids), dict(sampling), asyncio.get_running_loop(), tag=tag, runs=max(1, runs))
        with self._cond:
            if ticket is not None and ticket.held:
                ticket.held = False
                self._admitted -= 1
                if self._closed:
                    raise ShuttingDownError("the server is shutting down")
            else:
                self._check_room()
            job.id = next(self._ids)
            self._waiting.append(job)
            self._cond.notify()
        return job

    def stats(self) -> dict[str, Any]:
        """Queue depth, counters and the most recent finished jobs (for /stats and the tests)."""
        with self._cond:
            return {
                "waiting": len(self._waiting),
                "admitted": self._admitted,  # requests with a body still being read or prepared
                "running": self.running is not None,
                "max_queue": self.max_queue,
                "completed": self.completed,
                "cancelled": self.cancelled,
                "failed": self.failed,
                "recent": list(self.recent),
            }

    def close(self) -> None:
        """Stop taking jobs; cancel the running one and fail the waiting ones (graceful shutdown)."""
        with self._cond:
            self._closed = True
            waiting = list(self._waiting)
            self._waiting.clear()
            running = self.running
            self._cond.notify_all()
        if running is not None:
            running.request_cancel()
        for job in waiting:
            job.request_cancel()
            job._put(JobError("the server is shutting down", "server_error", 503))
            job._put(DONE)

    def abandon(self, job: Job) -> None:
        """The client went away: drop the job if it still waits, else stop its generation."""
        with self._cond, contextlib.suppress(ValueError):
            self._waiting.remove(job)
        job.request_cancel()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker thread to finish its current job."""
        self._thread.join(timeout)

    # -- worker thread -------------------------------------------------------------------------------
    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job = self._waiting.popleft()
            self.running = job
            return job

    def _work(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            try:
                self._run(job)
            finally:
                with self._cond:
                    self.running = None
                job._put(DONE)

    def _generate(self, job: Job) -> None:
        """The job's choices one after another; each one's last response carries its finish_reason."""
        before = 0
        for index in range(job.runs):
            sampling = choice_sampling(job.sampling, index)
            for resp in self.runtime.stream_tokens(job.prompt_ids, cancel=job.cancel, **sampling):
                job.tokens = before + resp.generation_tokens
                if resp.finish_reason is not None:
                    job.finish_reason = resp.finish_reason
                job._put(resp)
            before = job.tokens
            if job.finish_reason == "cancelled":
                return

    def _run(self, job: Job) -> None:
        job.started_at = time.monotonic()
        if job.checks_at_cancel is not None:  # the client left while waiting: never start it
            job.finish_reason = "cancelled"
        else:
            try:
                self._generate(job)
            except ZlocalError as exc:  # e.g. the prompt no longer fits: the client's problem
                job.finish_reason = "error"
                job._put(JobError(str(exc), "invalid_request_error", 400))
            except Exception as exc:  # noqa: BLE001 - any engine failure must reach the client, not kill the worker
                job.finish_reason = "error"
                log.error("generation %d failed: %s: %s", job.id, type(exc).__name__, redact(str(exc)))
                job._put(JobError(f"generation failed ({type(exc).__name__})", "server_error", 500))
        with self._cond:
            if job.finish_reason == "cancelled":
                self.cancelled += 1
            elif job.finish_reason == "error":
                self.failed += 1
            else:
                self.completed += 1
            self.recent.append(
                {
                    "id": job.id,
                    "completion_id": job.tag,
                    "finish_reason": job.finish_reason,
                    "completion_tokens": job.tokens,
                    # Token steps begun after the cancel request: 1 = the step that saw it and stopped.
                    "steps_after_cancel": (
                        None if job.checks_at_cancel is None else job.cancel.checks - job.checks_at_cancel
                    ),
                    "queue_wait_s": round(job.started_at - job.enqueued_at, 4),
                    "run_s": round(time.monotonic() - job.started_at, 4),
                }
            )
