"""Triton kernel: every row's residual-stream steering for one layer, in one launch.

Imports triton at module level; `kernels.steering` imports this module lazily, so that
`import kernels.steering` works without triton and TRITON_INTERPRET is read at first use.
Validation and the PyTorch reference live in `kernels.steering`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def steer_residual_kernel(
    hidden_ptr,  # (num_rows, seq, hidden), last dim contiguous; updated in place
    vectors_ptr,  # (num_vectors, hidden), last dim contiguous
    index_ptr,  # (num_rows, K) int32/int64, contiguous; -1 = no item
    scale_ptr,  # (num_rows, K) fp32, contiguous
    mode_ptr,  # (num_rows, K) int8/int32, contiguous; 0 add, 1 ablate, 2 clamp
    normalize_ptr,  # (num_rows,) uint8 (a bool view)
    mask_ptr,  # (num_rows, seq) uint8 (a bool view); unused without HAS_MASK
    seq_len,
    hidden_size,
    num_vectors,
    stride_hidden_row,
    stride_hidden_pos,
    stride_vector,
    K: tl.constexpr,
    K_POW2: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    # One program per (row, position): the whole hidden vector sits in registers because
    # ablate/clamp need a full dot product before they can update any element.
    # int64 so that row * stride cannot overflow on long prefills.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // seq_len
    pos = pid % seq_len

    items = tl.arange(0, K_POW2)
    item_index = tl.load(index_ptr + row * K + items, mask=items < K, other=-1)
    item_mode = tl.load(mode_ptr + row * K + items, mask=items < K, other=-1).to(tl.int32)
    # Out-of-range indices and unknown modes are "no item" (as in the reference), so a
    # caller bug can neither fault memory nor touch the row.
    item_ok = (item_index >= 0) & (item_index < num_vectors) & (item_mode >= 0) & (item_mode <= 2)
    active = tl.sum(item_ok.to(tl.int32), axis=0) > 0
    if HAS_MASK:
        active = active & (tl.load(mask_ptr + row * seq_len + pos) != 0)

    # Inactive (row, position) pairs are neither read nor written: bit-identical by design.
    if active:
        offs = tl.arange(0, BLOCK_H)
        in_bounds = offs < hidden_size
        h_ptrs = hidden_ptr + row * stride_hidden_row + pos * stride_hidden_pos + offs
        h = tl.load(h_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
        norm_before = tl.sqrt(tl.sum(h * h, axis=0))

        # Items apply in order; each sees the previous result (unrolled: K is small).
        for k in tl.static_range(K):
            index = tl.load(index_ptr + row * K + k).to(tl.int64)
            mode = tl.load(mode_ptr + row * K + k).to(tl.int32)
            scale = tl.load(scale_ptr + row * K + k)
            ok = (index >= 0) & (index < num_vectors) & (mode >= 0) & (mode <= 2)
            safe_index = tl.where(ok, index, 0)
            # A padded item loads nothing: its mask is empty. Built from one compare because
            # `in_bounds & ok` (vector & scalar) gives ints, not bools, under the interpreter.
            limit = tl.where(ok, hidden_size, 0)
            v_ptrs = vectors_ptr + safe_index * stride_vector + offs
            v = tl.load(v_ptrs, mask=offs < limit, other=0.0).to(tl.float32)

            # Every mode is h + c * v for a scalar c, which keeps only h and v live in
            # registers (large hidden sizes would spill with separate add/projection arrays):
            #   add: c = scale;  ablate/clamp: c = (target - h.u) / |v|, u = v / |v|.
            # A zero vector gets 1/|v| := 0, making ablate/clamp an exact no-op (no NaN).
            sq_norm = tl.sum(v * v, axis=0)
            has_norm = sq_norm > 0.0
            inv_norm = tl.where(has_norm, 1.0 / tl.sqrt(tl.where(has_norm, sq_norm, 1.0)), 0.0)
            along = tl.sum(h * v, axis=0) * inv_norm
            target = tl.where(mode == 2, scale, 0.0)
            coef = tl.where(mode == 0, scale, (target - along) * inv_norm)
            h = tl.where(ok, h + coef * v, h)

        # repeng's normalize: restore the pre-steering norm (skipped if steering gave 0).
        do_normalize = tl.load(normalize_ptr + row) != 0
        norm_after = tl.sqrt(tl.sum(h * h, axis=0))
        rescale = do_normalize & (norm_after > 0.0)
        h = tl.where(rescale, h * (norm_before / tl.where(rescale, norm_after, 1.0)), h)

        tl.store(h_ptrs, h.to(hidden_ptr.dtype.element_ty), mask=in_bounds)
