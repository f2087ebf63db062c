"""Direction extraction math, checked against repeng's own read_representations (which runs
sklearn's PCA and repeng's sign rule) on random activations, and mean_diff against numpy."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import repeng.extract
import torch
from repeng.extract import DatasetEntry, read_representations

from steerserve.adapters.errors import AdapterError
from steerserve.adapters.steering.extract import METHODS, compute_direction

PAIRS, WIDTH = 12, 48


def _activations(seed: int, shift: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(N, H) float32 pairs with a planted concept direction (so the top component is well
    separated) plus noise and a shared per-pair offset."""
    rng = np.random.default_rng(seed)
    concept = rng.standard_normal(WIDTH)
    base = rng.standard_normal((PAIRS, WIDTH)) * 3
    scale = rng.uniform(0.5, 2.0, (PAIRS, 1))
    noise = 0.1 * rng.standard_normal((2, PAIRS, WIDTH))
    pos = base + shift + scale * concept + noise[0]
    neg = base - scale * concept + noise[1]
    return pos.astype(np.float32), neg.astype(np.float32)


def _repeng(pos: np.ndarray, neg: np.ndarray, method: str,
            monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """repeng's read_representations with the model run replaced by our activations."""
    layer = 3
    hiddens = np.empty((2 * len(pos), pos.shape[1]), np.float32)
    hiddens[::2], hiddens[1::2] = pos, neg  # repeng's order: positive, negative, ...

    def fake_hiddens(model, tokenizer, inputs, hidden_layers, batch_size):
        assert len(inputs) == 2 * len(pos) and list(hidden_layers) == [layer]
        return {layer: hiddens.copy()}  # pca_center edits it in place

    monkeypatch.setattr(repeng.extract, "batched_get_hiddens", fake_hiddens)
    monkeypatch.setattr(repeng.extract, "model_layer_list", lambda model: [None] * 8)
    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=8))
    dataset = [DatasetEntry(f"p{i}", f"n{i}") for i in range(len(pos))]
    return read_representations(model, None, dataset, hidden_layers=[layer],
                                method=method)[layer]


@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pca_matches_repeng(method: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    pos, neg = _activations(seed)
    expected = _repeng(pos, neg, method, monkeypatch)
    ours = compute_direction(torch.from_numpy(pos), torch.from_numpy(neg), method)
    assert ours.dtype == torch.float32 and ours.shape == (WIDTH,)
    assert torch.linalg.norm(ours).item() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(ours.numpy(), expected / np.linalg.norm(expected), atol=1e-5)


@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
def test_pca_matches_repeng_on_plain_noise(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    pos, neg = (rng.standard_normal((2, 6, 5)) * np.arange(1, 6)).astype(np.float32)
    expected = _repeng(pos, neg, method, monkeypatch)
    ours = compute_direction(torch.from_numpy(pos), torch.from_numpy(neg), method)
    np.testing.assert_allclose(ours.numpy(), expected / np.linalg.norm(expected), atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_sign_points_from_negative_to_positive(method: str) -> None:
    pos, neg = _activations(4)
    for flip in (1.0, -1.0):  # whatever sign the SVD picks, positives must project higher
        p, n = (torch.from_numpy(a) * flip for a in (pos, neg))
        direction = compute_direction(p, n, method)
        assert bool(((p - n) @ direction > 0).all())
        swapped = compute_direction(n, p, method)
        assert torch.allclose(swapped, -direction, atol=1e-6)


def test_mean_diff_matches_numpy() -> None:
    pos, neg = _activations(7)
    expected = (pos.astype(np.float64) - neg).mean(axis=0)
    ours = compute_direction(torch.from_numpy(pos), torch.from_numpy(neg), "mean_diff")
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6, atol=1e-6)
    one = compute_direction(torch.ones(1, 3), torch.zeros(1, 3), "mean_diff")
    assert torch.equal(one, torch.ones(3))  # a single pair is enough, and not normalised


def _refusal(pos: torch.Tensor, neg: torch.Tensor, method: str, fragment: str) -> None:
    with pytest.raises(AdapterError, match=fragment) as info:
        compute_direction(pos, neg, method)
    assert info.value.status == 400


def test_refusals() -> None:
    good = torch.randn(4, 8)
    _refusal(good, good, "umap", "unknown extraction method")
    _refusal(good, torch.randn(4, 9), "mean_diff", "differ in shape")
    _refusal(torch.randn(0, 8), torch.randn(0, 8), "mean_diff", "at least 1 contrast pair")
    _refusal(torch.randn(1, 8), torch.randn(1, 8), "pca_diff", "at least 2 contrast pair")
    _refusal(torch.randn(1, 8), torch.randn(1, 8), "pca_center", "at least 2 contrast pair")
    _refusal(torch.randn(8), torch.randn(8), "mean_diff", "2-D float tensor")
    bad = good.clone()
    bad[2, 3] = float("nan")
    _refusal(bad, good, "pca_diff", "NaN or infinite")
    _refusal(good, good.clone().fill_(float("inf")), "mean_diff", "NaN or infinite")
    _refusal(good, good, "mean_diff", "identical on average")
    same_diff = good + torch.arange(8.0)  # every pair differs by the same vector
    _refusal(same_diff, good, "pca_diff", "do not vary")
    with pytest.raises(AdapterError) as info:
        compute_direction(good, good, "nope")
    assert info.value.param == "method"


@pytest.mark.parametrize("method", ["pca_diff", "pca_center"])
def test_sign_tie_keeps_sklearn_convention(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One pair says +a, the other -a: repeng's rule ties, so sklearn's svd_flip sign stays."""
    a = np.random.default_rng(9).standard_normal(WIDTH).astype(np.float32)
    zero = np.zeros(WIDTH, np.float32)
    pos, neg = np.stack([a, zero]), np.stack([zero, a])
    expected = _repeng(pos, neg, method, monkeypatch)
    ours = compute_direction(torch.from_numpy(pos), torch.from_numpy(neg), method)
    np.testing.assert_allclose(ours.numpy(), expected / np.linalg.norm(expected), atol=1e-5)
    assert ours[ours.abs().argmax()] > 0
