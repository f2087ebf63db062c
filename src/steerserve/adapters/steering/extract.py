"""Steering directions from contrastive activations: pure math, no model.

Row i of `positive` and row i of `negative` are one pair's activations at one layer. Methods:
- mean_diff: mean of (positive - negative), not normalised (CAA / steering-vectors' mean
  difference).
- pca_diff: repeng's default: first principal component of the pair differences.
- pca_center: repeng's: each pair centred on its mean, all 2N rows stacked, first principal
  component.
The PCA methods match sklearn's PCA(n_components=1) as repeng calls it: the rows are centred
before the SVD, the component is unit norm, and its sign follows repeng's rule (flip when more
pairs project lower on the positive side than higher); ties keep sklearn's sign convention
(largest |entry| positive). Arithmetic is float64 whatever the input dtype; the result is a
float32 CPU tensor.
"""

from __future__ import annotations

import torch

from steerserve.adapters.errors import AdapterError

METHODS = ("mean_diff", "pca_diff", "pca_center")
_MIN_PAIRS = {"mean_diff": 1, "pca_diff": 2, "pca_center": 2}


def compute_direction(positive: torch.Tensor, negative: torch.Tensor,
                      method: str) -> torch.Tensor:
    """(N, H) positive and negative activations -> (H,) float32 direction."""
    _check_inputs(positive, negative, method)
    pos = positive.detach().to(torch.float64)  # (N, H)
    neg = negative.detach().to(torch.float64)  # (N, H)
    if method == "mean_diff":
        direction = _mean_diff(pos, neg)
    else:
        direction = _first_component(_pca_rows(pos, neg, method), method)
        direction = _repeng_sign(direction, pos, neg)
    return direction.to("cpu", torch.float32).contiguous()


def _check_inputs(positive: torch.Tensor, negative: torch.Tensor, method: str) -> None:
    if method not in METHODS:
        raise AdapterError(f"unknown extraction method '{method}'; use one of "
                           f"{', '.join(METHODS)}", param="method")
    for label, t in (("positive", positive), ("negative", negative)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
            raise AdapterError(f"{label} activations must be a 2-D float tensor (pairs, "
                               "hidden)", param="positive")
    if positive.shape != negative.shape:
        raise AdapterError(f"positive activations {list(positive.shape)} and negative "
                           f"activations {list(negative.shape)} differ in shape",
                           param="positive")
    pairs, width = positive.shape
    if pairs < _MIN_PAIRS[method] or width < 1:
        raise AdapterError(f"{method} needs at least {_MIN_PAIRS[method]} contrast pair(s) of "
                           f"non-empty activations, got {pairs} of width {width}",
                           param="positive")
    if not (torch.isfinite(positive).all() and torch.isfinite(negative).all()):
        raise AdapterError("activations contain NaN or infinite values (the model overflowed "
                           "at this layer?)", param="positive")


def _mean_diff(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    direction = (pos - neg).mean(dim=0)  # (H,)
    if not direction.any():
        raise AdapterError("positive and negative activations are identical on average; "
                           "mean_diff has no direction", param="positive")
    return direction


def _pca_rows(pos: torch.Tensor, neg: torch.Tensor, method: str) -> torch.Tensor:
    if method == "pca_diff":
        return pos - neg  # (N, H)
    center = (pos + neg) / 2  # (N, H)
    # Interleaved [p0, n0, p1, n1, ...] like repeng; PCA does not depend on row order.
    return torch.stack((pos - center, neg - center), dim=1).reshape(-1, pos.shape[1])  # (2N, H)


def _first_component(rows: torch.Tensor, method: str) -> torch.Tensor:
    centered = rows - rows.mean(dim=0)  # sklearn's PCA centres before its SVD
    _, singular, vh = torch.linalg.svd(centered, full_matrices=False)  # vh: (K, H)
    # Variation at float32 rounding level (identical differences) is no direction at all.
    if singular[0].item() <= 1e-5 * torch.linalg.norm(rows).item():
        raise AdapterError(f"{method}: the contrast rows do not vary, so they have no "
                           "principal component (need distinct pairs; try mean_diff)",
                           param="positive")
    component = vh[0]  # (H,), unit norm
    # sklearn's svd_flip (u_based_decision=False): the largest |entry| is positive.
    pivot = component[component.abs().argmax()]
    return component if pivot >= 0 else -component


def _repeng_sign(direction: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Flip when more pairs have positive below negative along the direction than above."""
    pos_proj = pos @ direction  # (N,)
    neg_proj = neg @ direction  # (N,)
    smaller = (pos_proj < neg_proj).sum().item()
    larger = (pos_proj > neg_proj).sum().item()
    return -direction if smaller > larger else direction
