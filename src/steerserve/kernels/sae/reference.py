"""PyTorch reference of the SAE feature edit: row by row, position by position, in fp32."""

from __future__ import annotations

import torch

from steerserve.kernels.sae.checks import _MODES, MODE_ADD, _check_edit


def _edit_position(
    x: torch.Tensor,  # (hidden,) fp32: the original residual at one position
    encoders: torch.Tensor,  # (U, hidden) fp32
    enc_bias: torch.Tensor,  # (U,) fp32
    threshold: torch.Tensor,  # (U,) fp32
    decoders: torch.Tensor,  # (U, hidden) fp32
    slots: list[tuple[int, int, float]],  # (feature index, mode, value), all valid
) -> torch.Tensor:
    # Every feature is encoded from the same x (SAELens encodes once, edits, decodes the
    # difference), so the slots' order does not matter.
    delta = torch.zeros_like(x)
    for u, mode, value in slots:
        pre = torch.dot(x, encoders[u]) + enc_bias[u]
        act = pre if pre > threshold[u] else torch.zeros_like(pre)  # JumpReLU (ReLU at 0)
        coef = value if mode == MODE_ADD else value - act
        delta = delta + coef * decoders[u]
    return x + delta


def sae_edit_torch(
    hidden: torch.Tensor,  # (num_rows, seq, hidden) fp32/bf16/fp16, modified in place
    encoders: torch.Tensor,  # (U, hidden) fp32: row u = W_enc[:, j]
    enc_bias: torch.Tensor,  # (U,) fp32: b_enc[j] with b_dec folded in
    threshold: torch.Tensor,  # (U,) fp32: JumpReLU threshold, 0 for ReLU
    decoders: torch.Tensor,  # (U, hidden) fp32: row u = W_dec[j]
    feature_index: torch.Tensor,  # (num_rows, F) int32/int64, -1 = no feature
    mode: torch.Tensor,  # (num_rows, F) int8/int32, MODE_* codes
    value: torch.Tensor,  # (num_rows, F) fp32: ADD coefficient or CLAMP target
    position_mask: torch.Tensor | None = None,  # (num_rows, seq) bool; None = all
) -> torch.Tensor:
    """Reference: each masked position gets x + sum_f c_f * decoders[u_f], in fp32."""
    _check_edit(hidden, encoders, enc_bias, threshold, decoders, feature_index, mode, value,
                position_mask)  # fmt: skip
    num_rows, seq, _ = hidden.shape
    num_features = encoders.shape[0]
    # One host copy of the metadata; indices outside [0, U) and unknown modes are
    # "no feature", exactly as in the kernel.
    indices, modes, values = feature_index.tolist(), mode.tolist(), value.tolist()
    mask = position_mask.tolist() if position_mask is not None else None
    for r in range(num_rows):
        slots = [
            (u, m, v)
            for u, m, v in zip(indices[r], modes[r], values[r], strict=True)
            if 0 <= u < num_features and m in _MODES
        ]
        if not slots:
            continue  # not read, not written
        for s in range(seq):
            if mask is not None and not mask[r][s]:
                continue
            x = hidden[r, s].float()
            edited = _edit_position(x, encoders, enc_bias, threshold, decoders, slots)
            hidden[r, s] = edited.to(hidden.dtype)
    return hidden
