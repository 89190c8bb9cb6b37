"""The lean decode loop: our own prefill/decode over the HF model's forward (not ``generate``).

One ``Engine`` owns one model, one preallocated KV cache and the token ids the cache holds. Every
call reuses the prefix shared with what is cached, so a multi-turn chat prefills little more than
the new turn. Generation is a generator yielding ``GenerationResponse`` objects, one per emitted
piece of text, and a last one carrying ``finish_reason``.

Reuse is exact: ``prefill`` returns bit-identical logits whatever the cache held before, so a
request gives the same tokens for the same seed (or greedy), given the same model, ``prefill_chunk``
and thread count (the kernels are deterministic for a given shape). Floating-point results depend on
how a position was computed: a one-token decode step and a prefill chunk take different kernels, and
chunks of different lengths take different matmul paths (int8/int4 prompts switch to a block-wise
GEMM from 24-32 tokens) and round differently. So prefill runs in chunks aligned to absolute
positions, ``[k*C, (k+1)*C)`` for ``C = prefill_chunk``, and a request reuses only cached positions
that full aligned prefill chunks wrote (``exact_len``), rounded down to a chunk boundary: every
position it keeps was computed from the same tokens by the same code as a cold run would compute it.
Positions written by decode steps or by a prompt's last, partial chunk are prefilled again.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from zlocal.errors import ContextOverflowError, InvalidArgumentError
from zlocal.inference.detok import IncrementalDecoder, StopStringFilter
from zlocal.inference.fastpath import FastForward, unsupported_reason
from zlocal.inference.kvcache import KVCache
from zlocal.inference.logprobs import TokenLogprob, token_logprob
from zlocal.inference.sampling import SamplingParams, adjusted_logits, make_generator, sample, sample_adjusted


@dataclass
class GenerationResponse:
    """One step of streamed output. ``text`` is the new text since the previous response."""

    text: str
    token: int | None
    prompt_tokens: int
    generation_tokens: int
    reused_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tps: float = 0.0
    time_to_first_token: float = 0.0
    finish_reason: str | None = None  # "stop", "length" or "cancelled" on the last response
    logprob: TokenLogprob | None = None  # of ``token``, only when SamplingParams.logprobs is set


# Aligned prefill chunk: the most a request re-prefills beyond what it shares with the cache (see
# the module docstring). Past the int8/int4 block-wise GEMM crossovers (24-32 tokens) so full chunks
# take the fast prompt path.
DEFAULT_PREFILL_CHUNK = 128
# On a GPU a forward costs launches and per-call weight work (bitsandbytes, GPTQ) rather than
# bandwidth, so prompts go in larger chunks there; alignment makes any fixed size deterministic.
CUDA_PREFILL_CHUNK = 512
# Calls whose (reused, prefilled) counts ``EngineStats.history`` keeps: a server makes one per
# request for its whole life, so an unbounded list would grow without end.
HISTORY_LEN = 64


@dataclass
class EngineStats:
    """Counters over the engine's life; tests use them to prove prefix reuse."""

    calls: int = 0
    prefilled_tokens: int = 0
    reused_tokens: int = 0
    generated_tokens: int = 0
    last_prefilled: int = 0
    last_reused: int = 0
    # (reused, prefilled) of the last HISTORY_LEN calls, oldest first
    history: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=HISTORY_LEN))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the shared prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _pick(logits, params: SamplingParams, seen, rng, constraint=None) -> tuple[int, TokenLogprob | None]:
    """The next token, and its logprobs when asked for (the default path computes nothing extra).

    A grammar ``constraint`` masks the logits first, so the penalty, the temperature, every filter,
    greedy and sampled draws, and the reported logprobs all see only the tokens it allows.
    """
    if constraint is not None:
        if params.greedy and not params.logprobs:
            # The argmax over the allowed tokens is the plain argmax whenever that one is allowed:
            # one bit to test instead of masking the whole vocabulary.
            adjusted = adjusted_logits(logits, params, seen)
            token = int(torch.argmax(adjusted))
            if constraint.allows(token):
                return token, None
        logits = constraint.mask(logits)
    if not params.logprobs:
        return sample(logits, params, seen, rng), None
    # The same adjusted logits feed the draw and the reported distribution (see zlocal.inference.logprobs).
    adjusted = adjusted_logits(logits, params, seen)
    token = sample_adjusted(adjusted, params, rng)
    return token, token_logprob(adjusted, token, params.top_logprobs)


class Engine:
    """Prefill + decode over a causal LM with a preallocated cache and prefix reuse."""

    def __init__(
        self,
        model,
        tokenizer,
        max_context: int,
        stop_token_ids: Sequence[int] = (),
        prefill_chunk: int | None = None,
        fast: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_context = int(max_context)
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.cache = KVCache(num_layers, self.max_context)
        self.cached_ids: list[int] = []
        # Cache positions [0, exact_len) were written by full prefill chunks aligned to prefill_chunk:
        # the only ones a later request may reuse (see the module docstring).
        self.exact_len = 0
        self.stats = EngineStats()
        self.input_device = model.get_input_embeddings().weight.device
        if prefill_chunk is None:
            prefill_chunk = CUDA_PREFILL_CHUNK if self.input_device.type == "cuda" else DEFAULT_PREFILL_CHUNK
        self._chunk = max(1, int(prefill_chunk))
        # The lean forward when the model allows it; the HF forward otherwise (and as the reference).
        self.fast = None
        self.fast_reason = unsupported_reason(model) if fast else "disabled"
        if self.fast_reason is None:
            self.fast = FastForward(model, self.cache, self.max_context)
        # On CUDA only: one-token steps as a captured graph, and split plans moving the hidden state
        # once per device boundary (zlocal.inference.decode_step). The CPU keeps the paths above.
        self.step = None
        if fast and torch.cuda.is_available():
            from zlocal.inference.decode_step import for_engine

            self.step = for_engine(model, self.cache, self.max_context)

    @contextlib.contextmanager
    def without_stop_tokens(self):
        """Ignore EOS/end-of-turn tokens inside the block, so runs take exactly max_new_tokens steps
        (benchmarks and reference comparisons); restored afterwards."""
        saved, self.stop_token_ids = self.stop_token_ids, frozenset()
        try:
            yield self
        finally:
            self.stop_token_ids = saved

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens per prefill forward; chunks start at multiples of it."""
        return self._chunk

    @prefill_chunk.setter
    def prefill_chunk(self, n: int) -> None:
        # The cached positions were computed in chunks of the old size: a cold run would now
        # compute them differently, so none stays reusable.
        self._chunk = max(1, int(n))
        self.reset()

    def reset(self) -> None:
        """Forget the cached prefix (the buffers stay allocated)."""
        self.cache.truncate(0)
        self.cached_ids = []
        self.exact_len = 0

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise ContextOverflowError when prompt + new tokens exceed the context."""
        if prompt_len == 0:
            raise InvalidArgumentError("the prompt is empty")
        if prompt_len + max_new_tokens > self.max_context:
            raise ContextOverflowError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                f"{self.max_context} tokens; shorten the prompt, lower max_new_tokens "
                "or load with a larger context"
            )

    @torch.inference_mode()
    def _forward(self, ids: Sequence[int]) -> torch.Tensor:
        if self.step is not None and (len(ids) == 1 or self.fast is None):
            logits = self.step(list(ids))
        elif self.fast is not None:
            logits = self.fast(list(ids))
        else:
            input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.input_device)
            logits = self.model(
                input_ids=input_ids, cache=self.cache, use_cache=True, logits_to_keep=1
            ).logits[0, -1]
        self.cached_ids.extend(int(i) for i in ids)
        return logits

    def reusable(self, prompt_ids: Sequence[int]) -> int:
        """How many leading cache positions ``prefill(prompt_ids)`` keeps: the prefix shared with
        the cache, within what full aligned prefill chunks wrote, rounded down to a chunk boundary
        (the last prompt token always runs, to produce the logits)."""
        shared = min(common_prefix(self.cached_ids, prompt_ids), self.exact_len, len(prompt_ids) - 1)
        return shared - shared % self._chunk

    def prefill(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Bring the cache to ``prompt_ids`` reusing what it exactly shares; return next-token logits.

        The logits are bit-identical to a cold prefill of ``prompt_ids`` (empty cache).
        """
        if not prompt_ids:
            raise InvalidArgumentError("the prompt is empty: give at least one token")
        reuse = self.reusable(prompt_ids)
        self.cache.truncate(reuse)
        del self.cached_ids[reuse:]
        self.exact_len = reuse
        logits = None
        c = self._chunk
        for start in range(reuse, len(prompt_ids), c):  # reuse is a multiple of c
            logits = self._forward(prompt_ids[start : start + c])
            if start + c <= len(prompt_ids):
                self.exact_len = start + c  # a full aligned chunk: reusable later
        prefilled = len(prompt_ids) - reuse
        s = self.stats
        s.calls += 1
        s.prefilled_tokens += prefilled
        s.reused_tokens += reuse
        s.last_prefilled, s.last_reused = prefilled, reuse
        s.history.append((reuse, prefilled))
        return logits

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
        constraint=None,
    ) -> Iterator[GenerationResponse]:
        """Stream a completion of ``prompt_ids``. The caller holds the runtime lock.

        ``constraint`` (a ``grammar.TokenConstraint``) limits every token to what its grammar
        allows; the answer ends with finish_reason "stop" as soon as the grammar is complete.
        """
        prompt_ids = [int(i) for i in prompt_ids]
        self.check_fits(len(prompt_ids), params.max_new_tokens)
        rng = make_generator(params.seed)
        decoder = IncrementalDecoder(self.tokenizer)
        stopper = StopStringFilter(params.stop)
        t0 = time.perf_counter()
        logits = self.prefill(prompt_ids)
        t_prefill = time.perf_counter() - t0
        reused = self.stats.last_reused
        prompt_tps = self.stats.last_prefilled / max(t_prefill, 1e-9)
        seen = torch.tensor(prompt_ids, dtype=torch.long, device=logits.device)
        penalize = params.repetition_penalty != 1.0
        generated = 0
        t_first = 0.0
        t_decode = time.perf_counter()
        finish = "length"

        def response(
            text: str, token: int | None, reason: str | None = None, lp: TokenLogprob | None = None
        ) -> GenerationResponse:
            elapsed = time.perf_counter() - t_decode
            return GenerationResponse(
                text=text,
                token=token,
                prompt_tokens=len(prompt_ids),
                generation_tokens=generated,
                reused_tokens=reused,
                prompt_tps=prompt_tps,
                generation_tps=(generated - 1) / elapsed if generated > 1 and elapsed > 0 else 0.0,
                time_to_first_token=t_first,
                finish_reason=reason,
                logprob=lp,
            )

        while True:
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            token, lp = _pick(logits, params, seen if penalize else None, rng, constraint)
            if generated == 0:
                t_first = time.perf_counter() - t0
                t_decode = time.perf_counter()
            if token in self.stop_token_ids:
                finish = "stop"
                break
            if constraint is not None:
                constraint.accept(token)
            generated += 1
            self.stats.generated_tokens += 1
            text = stopper.feed(decoder.push(token))
            # One response per token, even when it completes no character yet (token ids stay whole).
            yield response(text, token, lp=lp)
            if stopper.stopped or (constraint is not None and constraint.done):
                finish = "stop"
                break
            if generated >= params.max_new_tokens:
                break
            if penalize:
                seen = torch.cat([seen, seen.new_tensor([token])])
            logits = self._forward([token])
        tail = "" if stopper.stopped else stopper.feed(decoder.flush()) + stopper.flush()
        if stopper.stopped and finish != "cancelled":
            finish = "stop"
        yield response(tail, None, finish)
