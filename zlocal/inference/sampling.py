"""Sampling parameters and the logits -> next-token step."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from zlocal.errors import InvalidArgumentError

# The most alternatives one token's logprobs may list (OpenAI's top_logprobs limit).
MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy (argmax), like ``do_sample=False``.

    Defaults (temperature 0.7, top-k 40, top-p 0.95, min-p 0.05) apply where the model's
    generation_config sets nothing; explicit arguments override both.
    """

    # llama.cpp-like defaults: truncating the tail keeps small models (SmolLM2) on topic.
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # Report each chosen token's log-probability, and the top_logprobs most likely alternatives
    # (see zlocal.inference.logprobs for which distribution). Off by default: nothing extra is computed.
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise InvalidArgumentError naming the first out-of-range field."""
        checks = [
            ("temperature", _finite(self.temperature) and self.temperature >= 0, ">= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", _finite(self.repetition_penalty) and self.repetition_penalty > 0, "> 0"),
            (
                "max_new_tokens",
                isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0,
                "an integer > 0",
            ),
            ("seed", self.seed is None or isinstance(self.seed, int), "an integer"),
            ("stop", all(isinstance(s, str) for s in self.stop), "a string or list of strings"),
            ("logprobs", isinstance(self.logprobs, bool), "true or false"),
            (
                "top_logprobs",
                isinstance(self.top_logprobs, int)
                and not isinstance(self.top_logprobs, bool)
                and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                f"an integer in 0..{MAX_TOP_LOGPROBS}",
            ),
        ]
        for name, ok, want in checks:
            if not ok:
                raise InvalidArgumentError(f"{name} must be {want}, got {getattr(self, name)!r}")
        if self.top_logprobs and not self.logprobs:
            raise InvalidArgumentError("top_logprobs needs logprobs=True")

    @property
    def greedy(self) -> bool:
        # Below ~1e-5 dividing the logits overflows to inf; the distribution is one-hot anyway.
        return self.temperature < 1e-5

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def make_generator(seed: int | None) -> torch.Generator | None:
    """A private RNG so that the same seed gives the same tokens whatever else runs."""
    if seed is None:
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF-style penalty: divide positive logits of seen tokens, multiply negative ones."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(0, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(0, seen, picked)


def adjusted_logits(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """The logits the filters start from: float32, repetition penalty applied, divided by the
    temperature (not when greedy: argmax needs no scaling and a tiny temperature would overflow)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if not params.greedy:
        logits = logits / params.temperature
    return logits


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token from a 1-D logits vector."""
    return sample_adjusted(adjusted_logits(logits, params, seen), params, generator)


def sample_adjusted(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> int:
    """Pick the next token from logits already through ``adjusted_logits``: argmax when greedy,
    else top-k, min-p and top-p filtering, then a draw from what is left."""
    if params.greedy:
        return int(torch.argmax(logits))
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = (cum - sorted_p) >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    probs = probs / probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
