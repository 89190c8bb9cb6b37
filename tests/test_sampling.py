"""Sampling: validation, greedy, top-k/top-p/min-p filters, repetition penalty, seeds."""

from __future__ import annotations

import pytest
import torch

from zlocal.errors import InvalidArgumentError
from zlocal.sampling import SamplingParams, apply_repetition_penalty, make_generator, sample


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
