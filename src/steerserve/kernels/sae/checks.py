"""Mode codes, limits and argument validation of the SAE feature edit (every backend)."""

from __future__ import annotations

import torch

from steerserve.kernels.checks import check_tensor, require

# Mode codes of a feature slot; anything else in `mode` is "no feature".
MODE_ADD = 0  # h + value * W_dec[j]
MODE_CLAMP = 1  # h + (value - act_j(h)) * W_dec[j]: the feature's activation becomes `value`

# Slots are unrolled in the kernel, so F is a compile-time constant kept small.
MAX_FEATURES = 16
# The kernel holds a whole hidden vector (plus one encoder and one decoder row) in one block,
# because each feature needs a full dot product; past this size registers spill heavily.
MAX_HIDDEN = 16384

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_MODE_DTYPES = (torch.int8, torch.int32)
_MODES = frozenset((MODE_ADD, MODE_CLAMP))


def _check_edit(
    hidden: torch.Tensor,
    encoders: torch.Tensor,
    enc_bias: torch.Tensor,
    threshold: torch.Tensor,
    decoders: torch.Tensor,
    feature_index: torch.Tensor,
    mode: torch.Tensor,
    value: torch.Tensor,
    position_mask: torch.Tensor | None,
) -> None:
    require(isinstance(hidden, torch.Tensor), "hidden must be a torch.Tensor")
    require(hidden.dim() == 3, f"hidden must be 3-D (num_rows, seq, hidden), got {hidden.dim()}-D")
    require(hidden.dtype in _FLOAT_DTYPES, f"hidden has unsupported dtype {hidden.dtype}")
    require(
        hidden.shape[-1] <= 1 or hidden.stride(-1) == 1,
        f"hidden must have a contiguous last dimension (stride {hidden.stride(-1)})",
    )
    num_rows, seq, hidden_size = hidden.shape
    require(hidden_size >= 1, "hidden must have a non-empty last dimension")
    require(hidden_size <= MAX_HIDDEN, f"hidden size {hidden_size} exceeds {MAX_HIDDEN}")
    device = hidden.device

    require(isinstance(encoders, torch.Tensor) and encoders.dim() == 2, "encoders must be 2-D")
    num_features = encoders.shape[0]
    # Rows may be strided (a slice of W_enc.T); the kernel takes their stride.
    fp32 = (torch.float32,)
    check_tensor("encoders", encoders, (num_features, hidden_size), fp32, device, False)
    check_tensor("decoders", decoders, (num_features, hidden_size), fp32, device, False)
    check_tensor("enc_bias", enc_bias, (num_features,), fp32, device)
    check_tensor("threshold", threshold, (num_features,), fp32, device)

    require(
        isinstance(feature_index, torch.Tensor) and feature_index.dim() == 2,
        "feature_index must be 2-D (num_rows, F)",
    )
    slots = feature_index.shape[1]
    require(1 <= slots <= MAX_FEATURES, f"F = {slots} features per row, expected 1..{MAX_FEATURES}")
    check_tensor("feature_index", feature_index, (num_rows, slots), _INDEX_DTYPES, device)
    check_tensor("mode", mode, (num_rows, slots), _MODE_DTYPES, device)
    check_tensor("value", value, (num_rows, slots), fp32, device)
    if position_mask is not None:
        check_tensor("position_mask", position_mask, (num_rows, seq), (torch.bool,), device)
