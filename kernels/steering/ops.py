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
from steerserve.kernels.checks import check_tensor, require

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



# --------------------------------------------------------------------------- validation


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


# --------------------------------------------------------------------------- dispatch


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _num_warps(block: int) -> int:
    # Enough threads that a big hidden vector does not spill: the compiler hoists all K
    # vector loads, so registers grow with K * block / threads (ptxas, sm_90, K = 8:
    # 2048/4 warps 96 regs, 4096/8 112, 8192/16 110, 16384/32 64 + 120 B spill).
    return 4 if block <= 2048 else 8 if block <= 4096 else 16 if block <= 8192 else 32


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
