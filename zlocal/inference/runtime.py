"""The embeddable runtime: ``zlocal.load(model) -> Runtime`` with chat, streaming and sessions.

A Runtime runs one generation at a time (a lock); others wait, or get BusyError when they ask
not to wait. ``cancel()`` stops the running generation from any thread within one token, and ends
streams created before it but not started yet. A stream takes the lock on its first ``next()``
and gives it back with its last response; a half-consumed stream left paused by its thread is
ended by that thread's next request (zlocal.inference.runtime_stream says exactly when).
``close()`` (or the end of a ``with`` block) frees the weights, KV cache and kernel scratch.
``astream_chat``/``astream_generate`` are the asyncio forms (zlocal.inference.aio).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from zlocal.checkpoint.resolve import DEFAULT_MODEL, ResolvedModel
from zlocal.errors import (
    DependencyError,
    InvalidArgumentError,
    RuntimeClosedError,
)
from zlocal.inference.completion import Completion, LoadInfo
from zlocal.inference.engine import Engine, GenerationResponse
from zlocal.inference.grammar import Grammar, GrammarCompiler
from zlocal.inference.grammar_format import StructuredChat, plan_chat
from zlocal.inference.loader import load_for_runtime
from zlocal.inference.logprobs import TokenTexts, chat_entry, legacy_logprobs
from zlocal.inference.runtime_load import generation_defaults, load_chat_template
from zlocal.inference.runtime_stream import (
    CLOSED,
    CLOSED_MSG,
    GenerationStream,
    acquire,
    forget_model,
    no_stream,
    return_memory,
)
from zlocal.inference.sampling import SamplingParams
from zlocal.inference.session import ChatSession
from zlocal.inference.template import ChatTemplate

__all__ = ["ChatSession", "Completion", "Runtime", "load", "load_chat_template", "sampling_params"]

_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
_STRUCTURED = ("response_format", "tools", "tool_choice", "parallel_tool_calls")
_ALIASES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens"}


def sampling_params(defaults: dict[str, Any] | None = None, **kwargs) -> SamplingParams:
    """Build SamplingParams from keyword arguments (OpenAI-style aliases accepted)."""
    merged = dict(defaults or {})
    for name, value in kwargs.items():
        key = _ALIASES.get(name, name)
        if key not in _SAMPLING_FIELDS:
            raise InvalidArgumentError(f"unknown sampling parameter {name!r}")
        if value is not None:
            merged[key] = value
    return SamplingParams(**merged)


class Runtime:
    """A loaded chat model ready to generate. Build it with ``zlocal.load``.

    Use it as a context manager (``with zlocal.load(...) as rt:``) or call ``close()`` to free the
    model's memory; a closed Runtime raises RuntimeClosedError.

    One generation runs at a time. A stream (``stream_*``, ``ChatSession.stream``) takes the
    runtime on its first ``next()`` and gives it back with its last response, on ``close()`` or
    when dropped. A waiting request from the thread that left a stream half-consumed ends that
    stream (finish_reason "cancelled") instead of deadlocking; zlocal.inference.runtime_stream
    has the whole protocol.
    """

    def __init__(
        self,
        model,
        tokenizer,
        template: ChatTemplate,
        info: LoadInfo,
        resolved: ResolvedModel,
        plan: Any = None,
        sampling_defaults: dict[str, Any] | None = None,
        threads: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.info = info
        self.resolved = resolved
        self.plan = plan
        self.sampling_defaults = sampling_defaults or {}
        self.max_context = info.max_context
        self.engine = Engine(model, tokenizer, info.max_context, template.stop_token_ids)
        self.threads = threads  # compute threads set at load (None: torch's setting as it is)
        self._lock = threading.Lock()
        self._holder = no_stream  # weak reference to the stream holding the lock
        self._cancel_epoch = 0  # Runtime.cancel() calls so far (streams remember it at creation)
        self._epoch_lock = threading.Lock()
        self._closed = False
        self._token_texts: TokenTexts | None = None
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = threading.Lock()

    @property
    def token_texts(self) -> TokenTexts:
        """Token id -> (text, bytes) as logprobs report them (built on first use, then cached)."""
        self._check_open()
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.tokenizer)
        return self._token_texts

    @property
    def grammars(self) -> GrammarCompiler:
        """The grammar compiler for this model: its vocabulary compiled once (on first use), then
        an LRU of compiled schemas (zlocal.inference.grammar)."""
        self._check_open()
        with self._grammars_lock:
            if self._grammars is None:
                n_vocab = self.model.config.get_text_config(decoder=True).vocab_size
                try:
                    self._grammars = GrammarCompiler(self.tokenizer, n_vocab, self.template.stop_token_ids)
                except (ValueError, RuntimeError, TypeError) as exc:  # e.g. a slow (Python) tokenizer
                    raise DependencyError(
                        f"structured output and tools need a fast tokenizer for this model: {exc}"
                    ) from exc
            return self._grammars

    # -- prompt building -------------------------------------------------------------------------
    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The exact prompt string fed to the model for these messages."""
        self._check_open()
        return self.template.render(messages, add_generation_prompt)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of the rendered chat prompt (with the generation prompt)."""
        self._check_open()
        return self.template.encode(messages)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize plain text."""
        self._check_open()
        if not isinstance(text, str):
            raise InvalidArgumentError("prompt must be a string")
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    # -- generation ------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop generations from any thread: the running one within one token, and every stream
        created before this call that has not started yet (it ends at once with finish_reason
        "cancelled"). Streams created after the call are not affected."""
        with self._epoch_lock:
            self._cancel_epoch += 1

    @property
    def busy(self) -> bool:
        """Whether a generation holds the runtime now."""
        return self._lock.locked()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` ran (the weights are freed)."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeClosedError(CLOSED_MSG)

    def stream_tokens(
        self,
        prompt_ids: Sequence[int],
        *,
        cancel: threading.Event | None = None,
        wait: bool = True,
        timeout: float | None = None,
        grammar: Grammar | None = None,
        **sampling,
    ) -> Iterator[GenerationResponse]:
        """Stream a completion of raw token ids (a GenerationStream).

        The stream takes the runtime lock on its first ``next()`` (waiting for a running generation,
        or BusyError with ``wait=False`` or after ``timeout`` seconds) and gives it back with its
        last response or ``close()``. A half-consumed stream paused by a thread is ended by that
        thread's next request; see zlocal.inference.runtime_stream. ``cancel`` (a threading.Event)
        stops it from any thread, as ``cancel()`` does. ``grammar`` (from ``self.grammars``)
        constrains every token; a fresh matcher runs per call.
        """
        self._check_open()
        params = sampling_params(self.sampling_defaults, **sampling)
        self.engine.check_fits(len(prompt_ids), params.max_new_tokens)
        constraint = self.grammars.constraint(grammar) if grammar is not None else None
        return GenerationStream(self, list(prompt_ids), params, cancel, wait, timeout, constraint)

    def _acquire(self, stream: GenerationStream, wait: bool, timeout: float | None) -> None:
        """Take the lock for ``stream`` (called by the stream on its first next())."""
        acquire(self._lock, self._holder, wait, timeout)
        if self._closed:  # closed while this stream waited
            self._lock.release()
            raise RuntimeClosedError(CLOSED_MSG)
        self._holder = weakref.ref(stream)

    def _release(self, stream: GenerationStream) -> None:
        self._holder = no_stream
        self._lock.release()

    def close(self) -> None:
        """Free the weights, KV cache, caches and kernel scratch; later use raises RuntimeClosedError.

        A running generation is cancelled first (it stops within a token) and a paused stream is
        ended. Idempotent. Freed memory goes back to the OS where glibc allows (``malloc_trim``);
        what threads left fragmented in glibc's per-thread arenas may stay resident (tens of MB;
        ``MALLOC_ARENA_MAX=2`` in the environment bounds it).
        """
        if self._closed:
            return
        self.cancel()  # a running or paused stream of any thread is now abandoned, so it ends
        acquire(self._lock, self._holder, True, None)
        try:
            if self._closed:
                return
            self._closed = True
            model = self.model
            self.model = self.engine = self.tokenizer = self.template = CLOSED
            self.plan, self._token_texts, self._grammars = None, None, None
        finally:
            self._lock.release()
        forget_model(model)
        del model
        return_memory()

    def __enter__(self) -> Runtime:
        self._check_open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def plan_chat(self, messages: Sequence[dict[str, Any]], **structured) -> StructuredChat:
        """Prompt ids, grammar and reply parser of a chat request (``response_format``, ``tools``,
        ``tool_choice``, ``parallel_tool_calls``; see zlocal.inference.grammar_format)."""
        return plan_chat(self, messages, **structured)

    def stream_chat(
        self, messages: Sequence[dict[str, Any]], *, structured: StructuredChat | None = None, **sampling
    ) -> Iterator[GenerationResponse]:
        """Stream the assistant's reply to ``messages`` as GenerationResponse objects (``.text`` deltas).

        ``response_format=``/``tools=`` (see ``chat_completion``) constrain the reply; the deltas are
        its raw text (tool calls in their ``<tool_call>`` form, see zlocal.inference.tools).
        """
        kw = {k: sampling.pop(k) for k in _STRUCTURED if k in sampling}
        plan = structured or self.plan_chat(messages, **kw)
        return self.stream_tokens(plan.prompt_ids, grammar=plan.grammar, **sampling)

    def chat_completion(self, messages: Sequence[dict[str, Any]], **sampling) -> Completion:
        """Generate the assistant's reply and return it with counts and timings.

        ``logprobs=True`` (and ``top_logprobs=k``, 0..20) fills ``Completion.logprobs`` with what the
        server's ``choices[0].logprobs.content`` holds; see zlocal.inference.logprobs for the distribution
        (with a grammar: the masked one, forbidden tokens at -inf).

        ``response_format``: a JSON schema dict, a pydantic model class, or an OpenAI
        ``{"type": "json_object" | "json_schema", ...}`` dict; the reply is constrained to it and
        ``Completion.parsed`` holds the parsed value. ``tools`` (OpenAI tool dicts or
        zlocal.inference.tools.FunctionTool), ``tool_choice`` and ``parallel_tool_calls``:
        ``Completion.tool_calls`` holds typed ToolCall objects and ``finish_reason`` is "tool_calls"
        when the model called any (still "length" when max_new_tokens cut the reply).
        """
        kw = {k: sampling.pop(k) for k in _STRUCTURED if k in sampling}
        plan = self.plan_chat(messages, **kw)
        done = self._collect(
            self.stream_chat(messages, structured=plan, **sampling), bool(sampling.get("logprobs"))
        )
        done.content, done.parsed, done.tool_calls = plan.read(done.text)
        if done.tool_calls and done.finish_reason != "length":  # cut short: a later call may be lost
            done.finish_reason = "tool_calls"
        return done

    def chat(self, messages: Sequence[dict[str, Any]], **sampling) -> Any:
        """The assistant's reply to ``messages``: its text; with ``response_format`` the parsed value
        (None if cut short); with ``tools`` the list of ToolCall when the model called any, else the text."""
        fmt = sampling.get("response_format")
        done = self.chat_completion(messages, **sampling)
        if done.tool_calls:
            return done.tool_calls
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            return done.parsed
        return done.text

    def stream_generate(self, prompt: str | Sequence[int], **sampling) -> Iterator[GenerationResponse]:
        """Stream a raw completion of a text prompt (no chat template) or of token ids."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        return self.stream_tokens(ids, **sampling)

    def generate(self, prompt: str | Sequence[int], **sampling) -> Completion:
        """Complete a raw text prompt (no chat template); returns text, token ids, counts, timings.

        With ``logprobs=True`` (``top_logprobs=k``), ``Completion.text_logprobs`` holds what the
        server's /v1/completions ``choices[0].logprobs`` holds (and ``logprobs`` the chat shape).
        """
        return self._collect(self.stream_generate(prompt, **sampling), bool(sampling.get("logprobs")))

    def _collect(self, stream: Iterator[GenerationResponse], want_logprobs: bool) -> Completion:
        t0 = time.perf_counter()
        parts, ids, last, lps, offsets, chars = [], [], None, [], [], 0
        for r in stream:
            if r.logprob is not None:
                lps.append(r.logprob)
                offsets.append(chars)  # where the token's text starts, as far as decoded
            chars += len(r.text)
            parts.append(r.text)
            if r.token is not None:
                ids.append(r.token)
            last = r
        texts = self.token_texts
        return Completion(
            text="".join(parts),
            token_ids=ids,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.generation_tokens,
            reused_tokens=last.reused_tokens,
            finish_reason=last.finish_reason,
            prompt_tps=last.prompt_tps,
            generation_tps=last.generation_tps,
            time_to_first_token=last.time_to_first_token,
            total_time=time.perf_counter() - t0,
            logprobs=[chat_entry(texts, lp) for lp in lps] if want_logprobs else None,
            text_logprobs=legacy_logprobs(texts, lps, offsets) if want_logprobs else None,
        )

    def astream_chat(
        self, messages: Sequence[dict[str, Any]], **sampling
    ) -> AsyncIterator[GenerationResponse]:
        """``stream_chat`` for asyncio: ``async for r in rt.astream_chat(messages, ...)``.

        The generation runs on a worker thread, so the event loop keeps running; closing the
        iterator (``aclose()``, ``break``, cancelling the task) cancels the generation.
        """
        from zlocal.inference.aio import astream

        return astream(self.stream_chat, messages, **sampling)

    def astream_generate(self, prompt: str | Sequence[int], **sampling) -> AsyncIterator[GenerationResponse]:
        """``stream_generate`` for asyncio (see ``astream_chat``)."""
        from zlocal.inference.aio import astream

        return astream(self.stream_generate, prompt, **sampling)

    def session(self, system: str | None = None, truncate: str = "oldest") -> ChatSession:
        """A stateful multi-turn chat that reuses the KV cache between turns."""
        self._check_open()
        return ChatSession(self, system=system, truncate=truncate)


def _check_threads(threads: Any) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0:
        raise InvalidArgumentError(f"threads must be a positive integer (compute threads), got {threads!r}")
    return threads


def load(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    plan: Any = "auto",
    dtype: str | None = None,
    device: str | None = None,
    max_context: int | None = None,
    chat_template: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    download: bool = False,
    revision: str | None = None,
    threads: int | None = None,
    progress=None,
    cache: bool | None = None,
) -> Runtime:
    """Load a chat model and return a Runtime (a context manager: ``with zlocal.load(...) as rt:``).

    ``model``: checkpoint directory, HF repo id in the local cache, or alias (``zephyr-7b-beta``,
    ``smollm2-135m``). ``max_context`` caps the KV cache (default: the model's context, at most 4096).
    ``chat_template``: a .jinja file overriding the checkpoint's template.
    ``threads``: compute threads for loading and generation (``torch.set_num_threads``, which
    zlocal's C kernels follow too; the setting is process-wide); None keeps torch's setting.
    ``progress``: a callback receiving ``zlocal.progress.Progress`` events while loading.
    ``cache``: read and write the prepared-form cache of a CPU plan (None: on by default).
    """
    threads = _check_threads(threads)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    resolved, config, tokenizer, template = load_chat_template(
        model, chat_template=chat_template, allow_pickle=allow_pickle, download=download, revision=revision
    )
    loaded = load_for_runtime(
        resolved,
        config,
        plan=plan,
        dtype=dtype,
        device=device,
        max_context=max_context,
        progress=progress,
        cache=cache,
    )
    info = LoadInfo(
        model=str(model),
        path=str(Path(resolved.path)),
        source=resolved.source,
        device=loaded.device,
        dtype=str(loaded.dtype).replace("torch.", ""),
        max_context=loaded.max_context,
        template=template.origin,
        load_seconds=time.perf_counter() - t0,
        extra={"plan": loaded.plan.to_dict()} if hasattr(loaded.plan, "to_dict") else {},
    )
    return Runtime(
        loaded.model,
        tokenizer,
        template,
        info,
        resolved,
        plan=loaded.plan,
        sampling_defaults=generation_defaults(loaded.model),
        threads=threads,
    )
