"""Sampling: validation, greedy, top-k/top-p/min-p filters, repetition penalty, seeds."""

from __future__ import annotations

import pytest
import torch

from zlocal.errors import InvalidArgumentError
from zlocal.inference.sampling import SamplingParams, apply_repetition_penalty, make_generator, sample


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"min_p": 1},
        {"top_k": -2},
        {"max_new_tokens": 0},
        {"repetition_penalty": 0},
        {"temperature": float("nan")},
        {"stop": [1]},
        {"seed": "x"},
    ],
)
def test_invalid_params_raise(kw):
    with pytest.raises(InvalidArgumentError):
        SamplingParams(**kw)


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample(logits, SamplingParams(temperature=0)) == 1


def test_top_k_one_equals_greedy():
    logits = torch.randn(1000)
    p = SamplingParams(temperature=1.0, top_k=1, seed=3)
    assert sample(logits, p, generator=make_generator(3)) == int(torch.argmax(logits))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = SamplingParams(temperature=1.0, top_p=0.7)
    g = make_generator(0)
    picks = {sample(logits, p, generator=g) for _ in range(200)}
    assert picks == {0, 1}


def test_min_p_drops_unlikely_tokens():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.07, 0.03]))
    p = SamplingParams(temperature=1.0, min_p=0.2)
    g = make_generator(0)
    picks = {sample(logits, p, generator=g) for _ in range(200)}
    assert picks == {0, 1}


def test_same_seed_same_draws_different_seed_differs():
    logits = torch.randn(500)
    p = SamplingParams(temperature=1.0)

    def draws(seed):
        g = make_generator(seed)
        return [sample(logits, p, generator=g) for _ in range(20)]

    a, b, c = draws(7), draws(7), draws(8)
    assert a == b and a != c


def test_repetition_penalty_matches_hf_processor():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(50)
    seen = torch.tensor([3, 7, 7, 20])
    ours = apply_repetition_penalty(logits.clone(), seen, 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(seen[None], logits.clone()[None])[0]
    torch.testing.assert_close(ours, theirs)


def test_tiny_temperature_is_greedy_not_nan():
    logits = torch.randn(100)
    assert sample(logits, SamplingParams(temperature=1e-38), generator=make_generator(0)) == int(
        torch.argmax(logits)
    )


class _OnlyTokens:
    """A stand-in grammar constraint allowing a fixed set of token ids (the interface of
    zlocal.inference.grammar)."""

    def __init__(self, allowed, vocab):
        self.forbid = torch.ones(vocab, dtype=torch.bool)
        self.forbid[list(allowed)] = False

    def allows(self, token):
        return not bool(self.forbid[token])

    def mask(self, logits):
        return logits.float().masked_fill(self.forbid, float("-inf"))


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 0},
        {"temperature": 0, "repetition_penalty": 5.0},
        {"temperature": 1.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0},
        {"temperature": 1.0, "top_k": 0, "top_p": 0.1, "min_p": 0.0},
        {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.5},
        {"temperature": 0.5, "top_k": 3, "top_p": 0.9, "min_p": 0.2, "logprobs": True, "top_logprobs": 3},
    ],
)
def test_grammar_mask_comes_before_penalty_temperature_and_filters(kw):
    """The raw favourites (0, 1) are forbidden: filters that ran before the mask would keep only
    them and leave nothing to draw; after it, the best allowed token (7) wins the cut."""
    from zlocal.inference.engine import _pick

    logits = torch.full((16,), -5.0)
    logits[0], logits[1], logits[7], logits[9] = 10.0, 9.0, 3.0, 1.0
    constraint = _OnlyTokens([7, 9, 12], 16)
    seen = torch.tensor([7]) if kw.get("repetition_penalty") else None
    params = SamplingParams(seed=0, **kw)
    picks = {_pick(logits, params, seen, make_generator(s), constraint)[0] for s in range(20)}
    assert picks <= {7, 9, 12}
    if params.repetition_penalty != 1.0:  # seen 7 is penalized to 0.6: 9 (1.0) is the best allowed
        assert picks == {9}
    if kw.get("top_k") == 1 or kw.get("top_p") == 0.1 or kw.get("min_p") == 0.5:
        assert picks == {7}
    if params.logprobs:
        _, lp = _pick(logits, params, seen, make_generator(0), constraint)
        allowed = torch.log_softmax(torch.tensor([3.0, 1.0, -5.0]) / 0.5, dim=0)  # renormalized over 7, 9, 12
        assert lp.logprob == pytest.approx(float(allowed[0]), abs=1e-5)
        assert [t for t, _ in lp.top] == [7, 9, 12]
