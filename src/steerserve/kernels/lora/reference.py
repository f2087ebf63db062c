"""PyTorch reference implementations of the multi-LoRA ops (BGMV and SGMV)."""

from __future__ import annotations

from itertools import pairwise

import torch

from steerserve.kernels.lora.checks import (
    _check_bgmv_expand,
    _check_bgmv_shrink,
    _check_pair,
    _check_sgmv_expand,
    _check_sgmv_shrink,
)

# Straightforward loops over the adapters actually used. They sync with the host (to list
# the slots) and validate slot ranges and segment bounds, which the kernels cannot afford.


def _slots_in_use(adapter_index: torch.Tensor, num_slots: int) -> list[int]:
    slots = torch.unique(adapter_index).tolist()
    bad = [s for s in slots if s < -1 or s >= num_slots]
    if bad:
        raise ValueError(f"adapter slots {bad} out of range for {num_slots} slots (or -1)")
    return [s for s in slots if s >= 0]


def _segment_list(starts: torch.Tensor, seg_slot: torch.Tensor, num_rows: int,
                  num_slots: int) -> list[tuple[int, int, int]]:
    """[(start, end, slot)] for non-empty segments that use an adapter."""
    bounds = starts.tolist()
    if bounds[0] < 0 or bounds[-1] > num_rows or any(a > b for a, b in pairwise(bounds)):
        raise ValueError(f"segment_starts must be non-decreasing within [0, {num_rows}], "
                         f"got {bounds}")
    _slots_in_use(seg_slot, num_slots)
    segments = zip(bounds[:-1], bounds[1:], seg_slot.tolist(), strict=True)
    return [(s, e, slot) for s, e, slot in segments if slot >= 0 and e > s]


def _shrink_rows(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(M, K) @ (R, K)^T -> (M, R), fp32 accumulation, rounded to x's dtype."""
    return (x.float() @ a.float().T).to(x.dtype)


def _expand_rows(t: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
    """New y rows: y (M, OUT) + scale * t (M, R) @ b (OUT, R)^T, in fp32, rounded once."""
    return (y.float() + (t.float() @ b.float().T) * scale).to(y.dtype)


def lora_shrink_bgmv_torch(x: torch.Tensor, lora_a: torch.Tensor,
                           adapter_index: torch.Tensor) -> torch.Tensor:
    _check_bgmv_shrink(x, lora_a, adapter_index)
    t = x.new_zeros((x.shape[0], lora_a.shape[1]))  # (N, R)
    for slot in _slots_in_use(adapter_index, lora_a.shape[0]):
        rows = adapter_index == slot  # (N,) bool
        t[rows] = _shrink_rows(x[rows], lora_a[slot])
    return t


def lora_expand_bgmv_torch(t: torch.Tensor, lora_b: torch.Tensor, adapter_index: torch.Tensor,
                           scaling: torch.Tensor, y: torch.Tensor) -> None:
    _check_bgmv_expand(t, lora_b, adapter_index, scaling, y)
    for slot in _slots_in_use(adapter_index, lora_b.shape[0]):
        rows = adapter_index == slot  # (N,) bool
        y[rows] = _expand_rows(t[rows], lora_b[slot], scaling[slot], y[rows])


def lora_shrink_sgmv_torch(x: torch.Tensor, lora_a: torch.Tensor, segment_starts: torch.Tensor,
                           segment_adapter: torch.Tensor,
                           max_segment_len: int | None = None) -> torch.Tensor:
    """max_segment_len is a grid hint for the kernel; the reference ignores it."""
    _check_sgmv_shrink(x, lora_a, segment_starts, segment_adapter)
    t = x.new_zeros((x.shape[0], lora_a.shape[1]))  # (N, R)
    segments = _segment_list(segment_starts, segment_adapter, x.shape[0], lora_a.shape[0])
    for start, end, slot in segments:
        t[start:end] = _shrink_rows(x[start:end], lora_a[slot])
    return t


def lora_expand_sgmv_torch(t: torch.Tensor, lora_b: torch.Tensor, segment_starts: torch.Tensor,
                           segment_adapter: torch.Tensor, scaling: torch.Tensor, y: torch.Tensor,
                           max_segment_len: int | None = None) -> None:
    _check_sgmv_expand(t, lora_b, segment_starts, segment_adapter, scaling, y)
    segments = _segment_list(segment_starts, segment_adapter, t.shape[0], lora_b.shape[0])
    for start, end, slot in segments:
        y[start:end] = _expand_rows(t[start:end], lora_b[slot], scaling[slot], y[start:end])


def apply_lora_bgmv_torch(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          adapter_index: torch.Tensor, scaling: torch.Tensor,
                          y: torch.Tensor) -> None:
    _check_pair(lora_a, lora_b)
    t = lora_shrink_bgmv_torch(x, lora_a, adapter_index)  # (N, R)
    lora_expand_bgmv_torch(t, lora_b, adapter_index, scaling, y)


def apply_lora_sgmv_torch(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          segment_starts: torch.Tensor, segment_adapter: torch.Tensor,
                          scaling: torch.Tensor, y: torch.Tensor,
                          max_segment_len: int | None = None) -> None:
    _check_pair(lora_a, lora_b)
    t = lora_shrink_sgmv_torch(x, lora_a, segment_starts, segment_adapter)  # (N, R)
    lora_expand_sgmv_torch(t, lora_b, segment_starts, segment_adapter, scaling, y)
