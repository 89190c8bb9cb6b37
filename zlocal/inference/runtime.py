"""The embeddable runtime: ``zlocal.load(model) -> Runtime`` with chat, streaming and sessions.

A Runtime runs one generation at a time (a lock); others wait, or get BusyError when they ask
not to wait. ``cancel()`` stops the running generation from any thread within one token.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from zlocal.checkpoint.resolve import DEFAULT_MODEL, ResolvedModel, resolve_model
from zlocal.errors import (
    BusyError,
    CheckpointError,
    ContextOverflowError,
    DependencyError,
    InvalidArgumentError,
)
from zlocal.inference.completion import Completion, LoadInfo
from zlocal.inference.engine import Engine, GenerationResponse
from zlocal.inference.grammar import Grammar, GrammarCompiler
from zlocal.inference.grammar_format import StructuredChat, plan_chat, response_grammar
from zlocal.inference.loader import load_config, load_for_runtime
from zlocal.inference.logprobs import TokenTexts, chat_entry, legacy_logprobs
from zlocal.inference.sampling import SamplingParams
from zlocal.inference.template import ChatTemplate, build_template, validate_messages

_SAMPLING_FIELDS = {f.name for f in fields(SamplingParams)}
_STRUCTURED = ("response_format", "tools", "tool_choice", "parallel_tool_calls")
_ALIASES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens"}


class _AnyEvent:
    """is_set() is true when any of the wrapped events is set."""

    def __init__(self, *events: threading.Event | None):
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


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
    """A loaded chat model ready to generate. Build it with ``zlocal.load``."""

    def __init__(
        self,
        model,
        tokenizer,
        template: ChatTemplate,
        info: LoadInfo,
        resolved: ResolvedModel,
        plan: Any = None,
        sampling_defaults: dict[str, Any] | None = None,
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
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._token_texts: TokenTexts | None = None
        self._grammars: GrammarCompiler | None = None
        self._grammars_lock = threading.Lock()

    @property
    def token_texts(self) -> TokenTexts:
        """Token id -> (text, bytes) as logprobs report them (built on first use, then cached)."""
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.tokenizer)
        return self._token_texts

    @property
    def grammars(self) -> GrammarCompiler:
        """The grammar compiler for this model: its vocabulary compiled once (on first use), then
        an LRU of compiled schemas (zlocal.inference.grammar)."""
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
        return self.template.render(messages, add_generation_prompt)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of the rendered chat prompt (with the generation prompt)."""
        return self.template.encode(messages)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize plain text."""
        if not isinstance(text, str):
            raise InvalidArgumentError("prompt must be a string")
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    # -- generation ------------------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop the running generation (from any thread) within one token."""
        self._cancel.set()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

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
        """Stream a completion of raw token ids. Holds the runtime lock while iterating.

        ``grammar`` (from ``self.grammars``) constrains every token; a fresh matcher runs per call.
        """
        params = sampling_params(self.sampling_defaults, **sampling)
        self.engine.check_fits(len(prompt_ids), params.max_new_tokens)
        constraint = self.grammars.constraint(grammar) if grammar is not None else None
        return self._locked_stream(list(prompt_ids), params, cancel, wait, timeout, constraint)

    def _locked_stream(self, prompt_ids, params, cancel, wait, timeout, constraint=None):
        acquired = self._lock.acquire(
            blocking=wait, timeout=timeout if (wait and timeout is not None) else -1
        )
        if not acquired:
            raise BusyError("another generation is running on this runtime; wait for it or cancel it")
        try:
            self._cancel.clear()
            yield from self.engine.generate(prompt_ids, params, _AnyEvent(self._cancel, cancel), constraint)
        finally:
            self._lock.release()

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

    def session(self, system: str | None = None, truncate: str = "oldest") -> ChatSession:
        """A stateful multi-turn chat that reuses the KV cache between turns."""
        return ChatSession(self, system=system, truncate=truncate)


class ChatSession:
    """Multi-turn chat state. Only the new turn is prefilled; the KV cache holds the rest.

    Truncation policy when history + max_new_tokens exceed the context: ``truncate="oldest"`` drops
    the oldest user/assistant exchanges (the system message is kept) until the prompt fits;
    ``truncate="error"`` raises ContextOverflowError instead.
    """

    def __init__(self, runtime: Runtime, system: str | None = None, truncate: str = "oldest"):
        if truncate not in ("oldest", "error"):
            raise InvalidArgumentError("truncate must be 'oldest' or 'error'")
        self.runtime = runtime
        self.truncate = truncate
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.dropped_turns = 0

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages = []

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt; the conversation restarts."""
        self.system = text or None
        self.reset()

    def _prompt(self, max_new_tokens: int) -> list[int]:
        while True:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
            ids = self.runtime.encode_chat(msgs)
            if len(ids) + max_new_tokens <= self.runtime.max_context or self.truncate == "error":
                return ids
            # Drop the oldest exchange (user + assistant); never the turn being asked.
            if len(self.messages) <= 1:
                raise ContextOverflowError(
                    f"this message alone ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                    f"context of {self.runtime.max_context} tokens"
                )
            cut = 2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1
            self.messages = self.messages[cut:]
            self.dropped_turns += 1

    def stream(self, user_text: str, response_format: Any = None, **sampling) -> Iterator[GenerationResponse]:
        """Send a user message; stream the reply; the reply is appended to the history.

        ``response_format`` (as in ``Runtime.chat_completion``) constrains this turn's reply.
        """
        validate_messages([{"role": "user", "content": user_text}])
        params = sampling_params(self.runtime.sampling_defaults, **sampling)
        grammar, _ = response_grammar(lambda: self.runtime.grammars, response_format)
        if grammar is not None:
            sampling["grammar"] = grammar
        self.messages.append({"role": "user", "content": user_text})
        try:
            ids = self._prompt(params.max_new_tokens)
        except ContextOverflowError:
            self.messages.pop()
            raise
        return self._run(ids, sampling)

    def _run(self, ids, sampling):
        parts = []
        try:
            for r in self.runtime.stream_tokens(ids, **sampling):
                parts.append(r.text)
                yield r
        finally:
            self.messages.append({"role": "assistant", "content": "".join(parts)})

    def send(self, user_text: str, **sampling) -> str:
        """Send a user message and return the full reply."""
        return "".join(r.text for r in self.stream(user_text, **sampling))


def _generation_defaults(model) -> dict[str, Any]:
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return {}
    out: dict[str, Any] = {}
    if getattr(gc, "do_sample", None) is False:
        out["temperature"] = 0.0
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "min_p"):
        value = getattr(gc, name, None)
        if value is not None and name not in out:
            out[name] = value
    return out


def load_chat_template(
    model: str | os.PathLike = DEFAULT_MODEL,
    *,
    chat_template: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    download: bool = False,
    revision: str | None = None,
):
    """Resolve MODEL and build its validated chat template without loading any weights.

    Returns (resolved, config, tokenizer, template).
    """
    from transformers import AutoTokenizer

    resolved = resolve_model(model, revision=revision, download=download, allow_pickle=allow_pickle)
    config = load_config(resolved)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{resolved.name}: cannot load the tokenizer: {exc}") from exc
    eos = getattr(config, "eos_token_id", None)
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if tokenizer.eos_token_id is not None:
        eos_ids.append(tokenizer.eos_token_id)
    template = build_template(
        tokenizer, str(model), config, [e for e in eos_ids if e is not None], chat_template
    )
    return resolved, config, tokenizer, template


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
) -> Runtime:
    """Load a chat model and return a Runtime.

    ``model``: checkpoint directory, HF repo id in the local cache, or alias (``zephyr-7b-beta``,
    ``smollm2-135m``). ``max_context`` caps the KV cache (default: the model's context, at most 4096).
    ``chat_template``: a .jinja file overriding the checkpoint's template.
    """
    t0 = time.perf_counter()
    resolved, config, tokenizer, template = load_chat_template(
        model, chat_template=chat_template, allow_pickle=allow_pickle, download=download, revision=revision
    )
    loaded = load_for_runtime(
        resolved, config, plan=plan, dtype=dtype, device=device, max_context=max_context
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
        sampling_defaults=_generation_defaults(loaded.model),
    )
