"""Sampler processors on hand-made distributions."""

from __future__ import annotations

import math

import pytest
import torch

from steerserve.decoding.sampling.history import TokenHistory
from steerserve.decoding.sampling.params import SamplingParams
from steerserve.decoding.sampling.sampler import RowState, apply_penalties, sample, truncation_mask


def row(**params) -> RowState:
    sampling = SamplingParams(**params)
    return RowState(sampling, TokenHistory.for_request(sampling, (), 3, torch.device("cpu")))


def test_truncation_masks_top_k_top_p_min_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda **p: (~truncation_mask(logits.clone(), [row(**p)]))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.8) == [True, True, False, False]
    assert kept(top_p=0.81) == [True, True, True, False]
    assert kept(top_p=0.1) == [True, False, False, False]
    assert kept(min_p=0.25) == [True, True, True, False]
    assert kept(min_p=0.7) == [True, False, False, False]


def test_rows_keep_their_own_truncation():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    mask = truncation_mask(logits, [row(top_k=1), row(top_k=3)])
    assert (~mask).sum(dim=1).tolist() == [1, 3]
    assert not mask[0, 0] and mask[1, 0]


def reference_mask(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """One row, the whole vocabulary sorted, as HF's and vLLM's warpers do it."""
    probs, order = logits.softmax(-1).sort(descending=True)
    removed = torch.zeros_like(probs, dtype=torch.bool)
    if top_k > 0:
        removed[top_k:] = True
    if top_p < 1:
        removed |= (probs.cumsum(-1) - probs) >= top_p
    removed |= probs < min_p * probs[0]
    removed[0] = False
    return torch.zeros_like(removed).scatter_(0, order, removed)


@pytest.mark.parametrize("vocab", [3000, 20000])  # the second one has every ranking tier
def test_partial_ranking_truncates_exactly_as_a_full_sort(vocab):
    """Rows whose kept set ends inside the ranked candidates and rows that reach past them
    (flat distributions, top-p near 1, top-k past the candidates), in one batch."""
    torch.manual_seed(0)
    settings = [dict(top_p=0.9), dict(top_p=0.999), dict(top_k=40), dict(top_k=1000),
                dict(min_p=0.05), dict(min_p=1e-6), dict(top_k=300, top_p=0.95, min_p=0.01),
                dict(), dict(top_p=0.5), dict(top_k=6000, top_p=0.99)]
    for sharpness in (0.1, 1.0, 2.5, 4.0):  # flat to peaked
        logits = torch.randn(len(settings), vocab) * sharpness
        rows = [RowState(SamplingParams(**setting)) for setting in settings]
        mask = truncation_mask(logits.clone(), rows)
        for i, setting in enumerate(settings):
            expected = reference_mask(logits[i], setting.get("top_k", 0),
                                      setting.get("top_p", 1.0), setting.get("min_p", 0.0))
            assert torch.equal(mask[i], expected), (sharpness, setting)


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25,
                            repetition_penalty=2.0)
    history = TokenHistory.for_request(params, (3,), 4, torch.device("cpu"))
    for token in (0, 0, 1):
        history.add(token)
    apply_penalties(logits, [RowState(params, history)])
    # token 0: repetition 2.0/2 = 1.0, then -(2 * 0.25 + 0.5) = 0.0
    # token 1: repetition -2*2 = -4, then -(0.25 + 0.5); token 3 (prompt): 0.5 / 2
    assert logits[0].tolist() == [0.0, -4.75, 1.0, 0.25]


def test_logit_bias_and_greedy():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    result = sample(logits, [row(temperature=0.0, logit_bias=((0, 10.0),))])
    assert result.tokens.tolist() == [0]


def test_sampling_follows_the_distribution():
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.7, 0.2, 0.1])
    counts = torch.zeros(3)
    for _ in range(3000):
        state = RowState(SamplingParams(temperature=1.0), None, generator)
        counts[sample(probs.log().unsqueeze(0), [state]).tokens[0]] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.03)


def test_logprobs_before_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    result = sample(logits.clone(), [row(temperature=0.0, logprobs=2)])
    expected = logits.log_softmax(-1)[0]
    assert math.isclose(result.logprobs[0].item(), expected[0].item(), rel_tol=1e-6)
    assert result.top_ids[0].tolist() == [0, 1]


def test_draw_never_picks_a_token_of_probability_zero():
    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]]).repeat(4, 1)
    rows = [RowState(SamplingParams(temperature=1.0), None,
                     torch.Generator().manual_seed(i) if i % 2 else None) for i in range(4)]
    picked = {t for _ in range(200) for t in sample(logits.clone(), rows).tokens.tolist()}
    assert picked == {0, 1}


def test_a_row_that_is_no_distribution_stays_inside_the_vocabulary():
    logits = torch.full((2, 5), float("nan"))
    rows = [RowState(SamplingParams(temperature=1.0)), RowState(SamplingParams(temperature=1.0))]
    tokens = sample(logits, rows).tokens
    assert ((tokens >= 0) & (tokens < 5)).all()
