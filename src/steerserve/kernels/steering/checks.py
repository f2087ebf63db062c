"""Mode codes, limits and argument validation of the steering ops (both backends)."""

from __future__ import annotations

import torch

from steerserve.kernels.checks import check_tensor, require

# Mode codes of the residual op (adapters.steering.spec.SteerMode names them for requests).
MODE_ADD = 0  # h + scale * v
MODE_ABLATE = 1  # h - (h.u) u, u = v / |v|; scale ignored
MODE_CLAMP = 2  # h - (h.u) u + scale * u: the component along u becomes `scale`


# Items are unrolled in the kernel, so K is a compile-time constant kept small.
MAX_ITEMS = 8
# The residual kernel holds a whole hidden vector in one block (ablate needs a full dot);
# beyond 16384 (BLOCK 32768) sm_90 spills registers heavily (checked with ptxas, K = 8).
MAX_HIDDEN = 16384

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_MODE_DTYPES = (torch.int8, torch.int32)
_MODES = frozenset((MODE_ADD, MODE_ABLATE, MODE_CLAMP))


def _check_float_3d(name: str, value: torch.Tensor) -> tuple[int, int, int]:
    require(isinstance(value, torch.Tensor), f"{name} must be a torch.Tensor")
    require(value.dim() == 3, f"{name} must be 3-D (num_rows, seq, width), got {value.dim()}-D")
    require(value.dtype in _FLOAT_DTYPES, f"{name} has unsupported dtype {value.dtype}")
    require(
        value.shape[-1] <= 1 or value.stride(-1) == 1,
        f"{name} must have a contiguous last dimension (stride {value.stride(-1)})",
    )
    num_rows, seq, width = value.shape
    require(width >= 1, f"{name} must have a non-empty last dimension")
    return num_rows, seq, width


def _check_mask(mask: torch.Tensor | None, num_rows: int, seq: int, device: torch.device) -> None:
    if mask is not None:
        check_tensor("position_mask", mask, (num_rows, seq), (torch.bool,), device)


def _check_residual(
    hidden: torch.Tensor,
    vectors: torch.Tensor,
    vector_index: torch.Tensor,
    scale: torch.Tensor,
    mode: torch.Tensor,
    normalize: torch.Tensor,
    position_mask: torch.Tensor | None,
) -> None:
    num_rows, seq, hidden_size = _check_float_3d("hidden", hidden)
    require(hidden_size <= MAX_HIDDEN, f"hidden size {hidden_size} exceeds {MAX_HIDDEN}")
    device = hidden.device
    require(isinstance(vectors, torch.Tensor) and vectors.dim() == 2, "vectors must be 2-D")
    vector_dtypes = (hidden.dtype, torch.float32)
    check_tensor(
        "vectors", vectors, (vectors.shape[0], hidden_size), vector_dtypes, device, False
    )
    require(
        isinstance(vector_index, torch.Tensor) and vector_index.dim() == 2,
        "vector_index must be 2-D (num_rows, K)",
    )
    k = vector_index.shape[1]
    require(1 <= k <= MAX_ITEMS, f"K = {k} items per row, expected 1..{MAX_ITEMS}")
    check_tensor("vector_index", vector_index, (num_rows, k), _INDEX_DTYPES, device)
    check_tensor("scale", scale, (num_rows, k), (torch.float32,), device)
    check_tensor("mode", mode, (num_rows, k), _MODE_DTYPES, device)
    check_tensor("normalize", normalize, (num_rows,), (torch.bool,), device)
    _check_mask(position_mask, num_rows, seq, device)


def _check_heads(
    attn_out: torch.Tensor,
    head_offsets: torch.Tensor,
    offset_index: torch.Tensor,
    scale: torch.Tensor,
    position_mask: torch.Tensor | None,
) -> None:
    num_rows, seq, width = _check_float_3d("attn_out", attn_out)
    device = attn_out.device
    require(
        isinstance(head_offsets, torch.Tensor) and head_offsets.dim() == 3,
        "head_offsets must be 3-D (num_offsets, num_heads, head_dim)",
    )
    num_offsets, num_heads, head_dim = head_offsets.shape
    require(
        num_heads * head_dim == width,
        f"head_offsets is {num_heads} heads x {head_dim}, attn_out width is {width}",
    )
    check_tensor(
        "head_offsets", head_offsets, head_offsets.shape, (attn_out.dtype, torch.float32), device
    )
    check_tensor("offset_index", offset_index, (num_rows,), _INDEX_DTYPES, device)
    check_tensor("scale", scale, (num_rows,), (torch.float32,), device)
    _check_mask(position_mask, num_rows, seq, device)
