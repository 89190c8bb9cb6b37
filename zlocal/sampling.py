"""Sampling parameters and the logits -> next-token step."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .errors import InvalidArgumentError


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
        ]
        for name, ok, want in checks:
            if not ok:
                raise InvalidArgumentError(f"{name} must be {want}, got {getattr(self, name)!r}")

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


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token from a 1-D logits vector."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
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
