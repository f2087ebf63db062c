"""Per-request sparse-autoencoder feature edits for a continuously batched forward.

One in-place op at a layer's residual stream, as a PyTorch reference (`sae_edit_torch`),
a Triton launcher (`sae_edit_triton`) with the same signature and contract, a batched
PyTorch path (`dense.sae_edit_dense`), and an entry point that picks one per device type.

Each row names up to MAX_FEATURES (feature, mode, value) slots over the launch's U unique
features: ADD adds `value * W_dec[j]`; CLAMP sets the feature's activation to `value` by
adding `(value - act_j) * W_dec[j]`. All features are encoded from the same input. Only
(row, position) pairs with a valid slot and a True `position_mask` entry are read or
written. Triton is imported lazily (in `kernels.sae.edit`), never at import time here.
"""

from __future__ import annotations

import torch

from steerserve.kernels import dispatch
from steerserve.kernels.checks import require
from steerserve.kernels.sae.checks import (
    MAX_FEATURES,
    MAX_HIDDEN,
    MODE_ADD,
    MODE_CLAMP,
    _check_edit,
)
from steerserve.kernels.sae.reference import sae_edit_torch
from steerserve.kernels.steering.ops import _next_pow2, _num_warps

__all__ = [
    "MAX_FEATURES",
    "MAX_HIDDEN",
    "MODE_ADD",
    "MODE_CLAMP",
    "sae_edit",
    "sae_edit_torch",
    "sae_edit_triton",
]


def sae_edit_triton(
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
    """Same contract as `sae_edit_torch`; one program per (row, position)."""
    _check_edit(hidden, encoders, enc_bias, threshold, decoders, feature_index, mode, value,
                position_mask)  # fmt: skip
    num_rows, seq, hidden_size = hidden.shape
    if num_rows == 0 or seq == 0 or encoders.shape[0] == 0:
        return hidden  # nothing can be edited; also avoids launching on empty tensors

    from steerserve.kernels.sae.edit import sae_edit_kernel

    slots = feature_index.shape[1]
    block = _next_pow2(hidden_size)
    # The bool mask goes in as a uint8 view (no copy); the kernel tests `!= 0`. Without a
    # mask any pointer will do: HAS_MASK=False never reads it.
    mask_u8 = position_mask.view(torch.uint8) if position_mask is not None else value
    sae_edit_kernel[(num_rows * seq,)](
        hidden, encoders, enc_bias, threshold, decoders, feature_index, mode, value, mask_u8,
        seq, hidden_size, encoders.shape[0],
        hidden.stride(0), hidden.stride(1), encoders.stride(0), decoders.stride(0),
        F=slots, F_POW2=_next_pow2(slots), BLOCK_H=block, HAS_MASK=position_mask is not None,
        num_warps=_num_warps(block),
    )  # fmt: skip
    return hidden


def sae_edit(
    hidden: torch.Tensor,
    encoders: torch.Tensor,
    enc_bias: torch.Tensor,
    threshold: torch.Tensor,
    decoders: torch.Tensor,
    feature_index: torch.Tensor,
    mode: torch.Tensor,
    value: torch.Tensor,
    position_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply every row's SAE feature edits for one layer in place; Triton or PyTorch by device."""
    require(isinstance(hidden, torch.Tensor), "hidden must be a torch.Tensor")
    if dispatch.BACKENDS.use_triton("sae_edit", hidden.device):
        impl = sae_edit_triton
    else:
        from steerserve.kernels.sae.dense import sae_edit_dense as impl  # batched, not per row
    return impl(hidden, encoders, enc_bias, threshold, decoders, feature_index, mode, value,
                position_mask)  # fmt: skip
