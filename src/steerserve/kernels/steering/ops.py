"""Per-request activation steering for a continuously batched forward, one launch per layer.

Two in-place ops, each as a PyTorch reference (`*_torch`), a Triton launcher (`*_triton`)
with the same signature and contract, and an entry point that picks one per device type:

* `steer_residual`: at a decoder block's output, apply each row's steering items
  (add / ablate / clamp a vector, in order), optionally restoring the pre-steering norm.
* `steer_heads`: at the attention output projection's input, add a per-row scaled
  per-head offset (ITI / LoFiT).

Both touch only (row, position) pairs that have something to do and whose
`position_mask` entry is True; everything else is left bit-identical. Triton is imported
lazily (in `kernels.steer_residual` / `kernels.steer_heads`), never at import time here.
"""

from __future__ import annotations

import torch

from steerserve.kernels import dispatch
from steerserve.kernels.checks import require
from steerserve.kernels.steering.checks import (
    MAX_HIDDEN,
    MAX_ITEMS,
    MODE_ABLATE,
    MODE_ADD,
    MODE_CLAMP,
    _check_heads,
    _check_residual,
)
from steerserve.kernels.steering.reference import steer_heads_torch, steer_residual_torch

__all__ = [
    "MAX_HIDDEN",
    "MAX_ITEMS",
    "MODE_ABLATE",
    "MODE_ADD",
    "MODE_CLAMP",
    "steer_heads",
    "steer_heads_torch",
    "steer_heads_triton",
    "steer_residual",
    "steer_residual_torch",
    "steer_residual_triton",
]


# --------------------------------------------------------------------------- dispatch


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _num_warps(block: int) -> int:
    # Enough threads that a big hidden vector does not spill: the compiler hoists all K
    # vector loads, so registers grow with K * block / threads (ptxas, sm_90, K = 8:
    # 2048/4 warps 96 regs, 4096/8 112, 8192/16 110, 16384/32 64 + 120 B spill).
    return 4 if block <= 2048 else 8 if block <= 4096 else 16 if block <= 8192 else 32


# --------------------------------------------------------------------------- residual


def steer_residual_triton(
    hidden: torch.Tensor,  # (num_rows, seq, hidden) fp32/bf16/fp16, modified in place
    vectors: torch.Tensor,  # (num_vectors, hidden), hidden's dtype or fp32
    vector_index: torch.Tensor,  # (num_rows, K) int32/int64, -1 = no item
    scale: torch.Tensor,  # (num_rows, K) fp32
    mode: torch.Tensor,  # (num_rows, K) int8/int32, MODE_* codes
    normalize: torch.Tensor,  # (num_rows,) bool
    position_mask: torch.Tensor | None = None,  # (num_rows, seq) bool; None = all
) -> torch.Tensor:
    """Same contract as `steer_residual_torch`; one program per (row, position)."""
    _check_residual(hidden, vectors, vector_index, scale, mode, normalize, position_mask)
    num_rows, seq, hidden_size = hidden.shape
    if num_rows == 0 or seq == 0 or vectors.shape[0] == 0:
        return hidden  # nothing can be steered; also avoids launching on empty tensors

    from steerserve.kernels.steering.residual import steer_residual_kernel

    k = vector_index.shape[1]
    block = _next_pow2(hidden_size)
    # Bool tensors go in as uint8 views (no copy); the kernel tests `!= 0`.
    normalize_u8 = normalize.view(torch.uint8)
    mask_u8 = position_mask.view(torch.uint8) if position_mask is not None else normalize_u8
    steer_residual_kernel[(num_rows * seq,)](
        hidden, vectors, vector_index, scale, mode, normalize_u8, mask_u8,
        seq, hidden_size, vectors.shape[0],
        hidden.stride(0), hidden.stride(1), vectors.stride(0),
        K=k, K_POW2=_next_pow2(k), BLOCK_H=block, HAS_MASK=position_mask is not None,
        num_warps=_num_warps(block),
    )  # fmt: skip
    return hidden


def steer_residual(
    hidden: torch.Tensor,
    vectors: torch.Tensor,
    vector_index: torch.Tensor,
    scale: torch.Tensor,
    mode: torch.Tensor,
    normalize: torch.Tensor,
    position_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply every row's steering for one layer in place; Triton or PyTorch by device."""
    require(isinstance(hidden, torch.Tensor), "hidden must be a torch.Tensor")
    if dispatch.BACKENDS.use_triton("steer_residual", hidden.device):
        impl = steer_residual_triton
    else:
        from steerserve.kernels.steering.dense import (
            steer_residual_dense as impl,  # batched, not per row
        )
    return impl(hidden, vectors, vector_index, scale, mode, normalize, position_mask)


# --------------------------------------------------------------------------- head offsets


def steer_heads_triton(
    attn_out: torch.Tensor,  # (num_rows, seq, num_heads * head_dim), modified in place
    head_offsets: torch.Tensor,  # (num_offsets, num_heads, head_dim), attn_out's dtype or fp32
    offset_index: torch.Tensor,  # (num_rows,) int32/int64, -1 = none
    scale: torch.Tensor,  # (num_rows,) fp32
    position_mask: torch.Tensor | None = None,  # (num_rows, seq) bool; None = all
) -> torch.Tensor:
    """Same contract as `steer_heads_torch`; grid (row * seq, chunks of the width)."""
    _check_heads(attn_out, head_offsets, offset_index, scale, position_mask)
    num_rows, seq, width = attn_out.shape
    if num_rows == 0 or seq == 0 or head_offsets.shape[0] == 0:
        return attn_out

    from steerserve.kernels.steering.heads import steer_heads_kernel

    block = min(_next_pow2(width), 1024)
    mask_u8 = position_mask.view(torch.uint8) if position_mask is not None else scale
    grid = (num_rows * seq, (width + block - 1) // block)
    steer_heads_kernel[grid](
        attn_out, head_offsets, offset_index, scale, mask_u8,
        seq, width, head_offsets.shape[0],
        attn_out.stride(0), attn_out.stride(1),
        BLOCK=block, HAS_MASK=position_mask is not None, num_warps=4,
    )  # fmt: skip
    return attn_out


def steer_heads(
    attn_out: torch.Tensor,
    head_offsets: torch.Tensor,
    offset_index: torch.Tensor,
    scale: torch.Tensor,
    position_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add every row's head offsets for one layer in place; Triton or PyTorch by device."""
    require(isinstance(attn_out, torch.Tensor), "attn_out must be a torch.Tensor")
    if dispatch.BACKENDS.use_triton("steer_heads", attn_out.device):
        impl = steer_heads_triton
    else:
        from steerserve.kernels.steering.dense import (
            steer_heads_dense as impl,  # batched, not per row
        )
    return impl(attn_out, head_offsets, offset_index, scale, position_mask)
