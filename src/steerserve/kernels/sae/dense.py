"""Vectorized PyTorch SAE feature edit, for devices without a Triton backend.

`sae_edit_torch` loops over rows and positions (clear, and the reference the tests trust);
this runs every row of one layer as a gather and two batched contractions, with the same
contract: features encoded from the original input, untouched pairs keep their exact bits.
"""

from __future__ import annotations

import torch

from steerserve.kernels.sae.checks import MODE_ADD, MODE_CLAMP, _check_edit


def sae_edit_dense(
    hidden: torch.Tensor,  # (num_rows, seq, hidden), modified in place
    encoders: torch.Tensor,  # (U, hidden) fp32
    enc_bias: torch.Tensor,  # (U,) fp32
    threshold: torch.Tensor,  # (U,) fp32
    decoders: torch.Tensor,  # (U, hidden) fp32
    feature_index: torch.Tensor,  # (num_rows, F), -1 = no feature
    mode: torch.Tensor,  # (num_rows, F) MODE_* codes
    value: torch.Tensor,  # (num_rows, F) fp32
    position_mask: torch.Tensor | None = None,  # (num_rows, seq) bool; None = all
) -> torch.Tensor:
    """Same contract as `sae_edit_torch`, batched over rows and positions."""
    _check_edit(hidden, encoders, enc_bias, threshold, decoders, feature_index, mode, value,
                position_mask)  # fmt: skip
    num_rows, seq, _ = hidden.shape
    num_features = encoders.shape[0]
    if num_rows == 0 or seq == 0 or num_features == 0:
        return hidden
    known = (mode == MODE_ADD) | (mode == MODE_CLAMP)
    present = (feature_index >= 0) & (feature_index < num_features) & known  # (R, F)
    touched = present.any(dim=1).unsqueeze(1).expand(num_rows, seq)  # (R, S)
    if position_mask is not None:
        touched = touched & position_mask
    if not bool(touched.any()):
        return hidden

    # Absent slots gather row 0 (always valid) and get coefficient 0 below.
    safe = feature_index.clamp(0, num_features - 1).long()  # (R, F)
    enc = encoders[safe]  # (R, F, H)
    dec = decoders[safe]  # (R, F, H)
    x = hidden.float()  # (R, S, H): a copy for non-fp32, a view for fp32 (never written)
    pre = torch.einsum("rsh,rfh->rsf", x, enc) + enc_bias[safe].unsqueeze(1)  # (R, S, F)
    act = torch.where(pre > threshold[safe].unsqueeze(1), pre, torch.zeros_like(pre))
    val = value.unsqueeze(1)  # (R, 1, F)
    coef = torch.where((mode == MODE_ADD).unsqueeze(1), val, val - act)
    # where, not a multiply: an absent slot's NaN/inf value must not leak into delta.
    coef = torch.where(present.unsqueeze(1), coef, torch.zeros_like(coef))
    delta = torch.bmm(coef, dec)  # (R, S, H)
    edited = (x + delta).to(hidden.dtype)
    hidden.copy_(torch.where(touched.unsqueeze(-1), edited, hidden))
    return hidden
