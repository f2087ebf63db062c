"""Vectorized PyTorch versions of the steering ops, for devices without a Triton backend.

`steering.steer_residual_torch` loops over rows (clear, and the reference the tests trust);
at serving batch sizes that loop costs more than the steering itself. These run every row of
one layer as a few batched tensor ops, with the same contract: items in order, ablate/clamp
skipped for zero vectors, untouched (row, position) pairs keep their exact bits.
"""

from __future__ import annotations

import torch

from steerserve.kernels.steering.checks import (
    MODE_ADD,
    MODE_CLAMP,
    _check_heads,
    _check_residual,
)


def _item_masks(
    vector_index: torch.Tensor, mode: torch.Tensor, num_vectors: int
) -> torch.Tensor:
    """(R, K) bool: the item exists (index in range, known mode)."""
    known = (mode >= 0) & (mode <= MODE_CLAMP)
    return (vector_index >= 0) & (vector_index < num_vectors) & known


def _apply_item(
    h: torch.Tensor,  # (R, S, H) fp32
    v: torch.Tensor,  # (R, H) fp32: this item's vector per row
    scale: torch.Tensor,  # (R,) fp32
    mode: torch.Tensor,  # (R,)
    present: torch.Tensor,  # (R,) bool
) -> torch.Tensor:
    is_add = present & (mode == MODE_ADD)
    added = h + (scale.unsqueeze(1) * v).unsqueeze(1)
    v_norm = v.norm(dim=-1, keepdim=True)  # (R, 1)
    projects = present & (mode != MODE_ADD) & (v_norm.squeeze(1) > 0)
    u = (v / v_norm.clamp_min(torch.finfo(torch.float32).tiny)).unsqueeze(1)  # (R, 1, H)
    removed = h - (h * u).sum(-1, keepdim=True) * u
    clamped = removed + scale.view(-1, 1, 1) * u
    projected = torch.where((mode == MODE_CLAMP).view(-1, 1, 1), clamped, removed)
    h = torch.where(is_add.view(-1, 1, 1), added, h)
    return torch.where(projects.view(-1, 1, 1), projected, h)


def steer_residual_dense(
    hidden: torch.Tensor,  # (num_rows, seq, hidden), modified in place
    vectors: torch.Tensor,  # (num_vectors, hidden)
    vector_index: torch.Tensor,  # (num_rows, K), -1 = no item
    scale: torch.Tensor,  # (num_rows, K) fp32
    mode: torch.Tensor,  # (num_rows, K) MODE_* codes
    normalize: torch.Tensor,  # (num_rows,) bool
    position_mask: torch.Tensor | None = None,  # (num_rows, seq) bool; None = all
) -> torch.Tensor:
    """Same contract as `steer_residual_torch`, batched over rows."""
    _check_residual(hidden, vectors, vector_index, scale, mode, normalize, position_mask)
    num_rows, seq, _ = hidden.shape
    num_vectors = vectors.shape[0]
    if num_rows == 0 or seq == 0 or num_vectors == 0:
        return hidden
    present = _item_masks(vector_index, mode, num_vectors)  # (R, K)
    touched = present.any(dim=1).unsqueeze(1).expand(num_rows, seq)  # (R, S)
    if position_mask is not None:
        touched = touched & position_mask
    h = hidden.float()  # (R, S, H): a copy for non-fp32, a view for fp32 (never written)
    norm_before = h.norm(dim=-1, keepdim=True)
    safe_index = vector_index.clamp(0, num_vectors - 1).long()
    for k in range(vector_index.shape[1]):
        v = vectors[safe_index[:, k]].float()  # (R, H)
        h = _apply_item(h, v, scale[:, k], mode[:, k], present[:, k])
    norm_after = h.norm(dim=-1, keepdim=True)
    rescale = normalize.view(-1, 1, 1) & (norm_after > 0)
    h = torch.where(rescale, h * (norm_before / norm_after), h)
    hidden.copy_(torch.where(touched.unsqueeze(-1), h.to(hidden.dtype), hidden))
    return hidden


def steer_heads_dense(
    attn_out: torch.Tensor,  # (num_rows, seq, num_heads * head_dim), modified in place
    head_offsets: torch.Tensor,  # (num_offsets, num_heads, head_dim)
    offset_index: torch.Tensor,  # (num_rows,), -1 = none
    scale: torch.Tensor,  # (num_rows,) fp32
    position_mask: torch.Tensor | None = None,  # (num_rows, seq) bool; None = all
) -> torch.Tensor:
    """Same contract as `steer_heads_torch`, batched over rows."""
    _check_heads(attn_out, head_offsets, offset_index, scale, position_mask)
    num_rows, seq, width = attn_out.shape
    num_offsets = head_offsets.shape[0]
    if num_rows == 0 or seq == 0 or num_offsets == 0:
        return attn_out
    present = (offset_index >= 0) & (offset_index < num_offsets)  # (R,)
    offsets = head_offsets.reshape(num_offsets, width)[
        offset_index.clamp(0, num_offsets - 1).long()
    ].float()  # (R, W)
    steered = (attn_out.float() + (scale.unsqueeze(1) * offsets).unsqueeze(1)).to(attn_out.dtype)
    touched = present.view(-1, 1, 1) & (offsets != 0).unsqueeze(1)  # (R, 1, W)
    if position_mask is not None:
        touched = touched & position_mask.unsqueeze(-1)
    attn_out.copy_(torch.where(touched, steered, attn_out))
    return attn_out
