"""PyTorch reference implementations of the steering ops (row by row, in fp32)."""

from __future__ import annotations

import torch

from steerserve.kernels.steering.checks import (
    _MODES,
    MODE_ADD,
    MODE_CLAMP,
    _check_heads,
    _check_residual,
)

# --------------------------------------------------------------------------- residual


def _steer_positions(
    h: torch.Tensor,  # (n, hidden) fp32: the steered positions of one row
    vectors: torch.Tensor,  # (num_vectors, hidden)
    items: list[tuple[int, float, int]],  # (vector index, scale, mode), in order
    normalize: bool,
) -> torch.Tensor:
    norm_before = h.norm(dim=-1, keepdim=True)  # (n, 1)
    for index, scale, mode in items:
        v = vectors[index].float()  # (hidden,)
        if mode == MODE_ADD:
            h = h + scale * v
            continue
        v_norm = v.norm()
        if v_norm == 0:  # no direction to ablate or clamp along
            continue
        u = v / v_norm
        along = (h @ u).unsqueeze(-1)  # (n, 1)
        h = h - along * u
        if mode == MODE_CLAMP:
            h = h + scale * u
    if normalize:
        norm_after = h.norm(dim=-1, keepdim=True)  # (n, 1)
        h = torch.where(norm_after > 0, h * (norm_before / norm_after), h)
    return h


def steer_residual_torch(
    hidden: torch.Tensor,  # (num_rows, seq, hidden) fp32/bf16/fp16, modified in place
    vectors: torch.Tensor,  # (num_vectors, hidden), hidden's dtype or fp32
    vector_index: torch.Tensor,  # (num_rows, K) int32/int64, -1 = no item
    scale: torch.Tensor,  # (num_rows, K) fp32
    mode: torch.Tensor,  # (num_rows, K) int8/int32, MODE_* codes
    normalize: torch.Tensor,  # (num_rows,) bool
    position_mask: torch.Tensor | None = None,  # (num_rows, seq) bool; None = all
) -> torch.Tensor:
    """Reference: each row's items in order on its masked positions, computed in fp32."""
    _check_residual(hidden, vectors, vector_index, scale, mode, normalize, position_mask)
    num_rows, seq, _ = hidden.shape
    num_vectors = vectors.shape[0]
    # One host copy of the metadata; indices outside [0, num_vectors) and unknown modes
    # are "no item", exactly as in the kernel.
    indices, scales, modes = vector_index.tolist(), scale.tolist(), mode.tolist()
    norms = normalize.tolist()
    for r in range(num_rows):
        items = [
            (i, s, m)
            for i, s, m in zip(indices[r], scales[r], modes[r], strict=True)
            if 0 <= i < num_vectors and m in _MODES
        ]
        if not items:
            continue
        positions = (
            position_mask[r]
            if position_mask is not None
            else torch.ones(seq, dtype=torch.bool, device=hidden.device)
        )
        h = hidden[r, positions].float()  # (n, hidden)
        hidden[r, positions] = _steer_positions(h, vectors, items, norms[r]).to(hidden.dtype)
    return hidden


# --------------------------------------------------------------------------- head offsets


def steer_heads_torch(
    attn_out: torch.Tensor,  # (num_rows, seq, num_heads * head_dim), modified in place
    head_offsets: torch.Tensor,  # (num_offsets, num_heads, head_dim), attn_out's dtype or fp32
    offset_index: torch.Tensor,  # (num_rows,) int32/int64, -1 = none
    scale: torch.Tensor,  # (num_rows,) fp32
    position_mask: torch.Tensor | None = None,  # (num_rows, seq) bool; None = all
) -> torch.Tensor:
    """Reference: attn_out[r, t] += scale[r] * head_offsets[index[r]] (flattened), in fp32.

    Elements whose offset is exactly zero (unsteered heads) keep their input bits.
    """
    _check_heads(attn_out, head_offsets, offset_index, scale, position_mask)
    num_rows, seq, width = attn_out.shape
    num_offsets = head_offsets.shape[0]
    for r, (i, s) in enumerate(zip(offset_index.tolist(), scale.tolist(), strict=True)):
        if not 0 <= i < num_offsets:  # -1 (and, as in the kernel, out of range) = none
            continue
        positions = (
            position_mask[r]
            if position_mask is not None
            else torch.ones(seq, dtype=torch.bool, device=attn_out.device)
        )
        a = attn_out[r, positions]  # (n, width)
        offset = head_offsets[i].reshape(width).float()  # (width,)
        steered = (a.float() + s * offset).to(a.dtype)
        attn_out[r, positions] = torch.where(offset != 0, steered, a)
    return attn_out
