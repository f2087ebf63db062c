"""Triton kernel: every row's SAE feature edits for one layer, in one launch.

Imports triton at module level; `kernels.sae.ops` imports this module lazily, so that
`import kernels.sae.ops` works without triton and TRITON_INTERPRET is read at first use.
Validation and the PyTorch reference live beside it (`checks`, `reference`).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sae_edit_kernel(
    hidden_ptr,  # (num_rows, seq, hidden), last dim contiguous; updated in place
    enc_ptr,  # (U, hidden) fp32, last dim contiguous
    bias_ptr,  # (U,) fp32
    threshold_ptr,  # (U,) fp32
    dec_ptr,  # (U, hidden) fp32, last dim contiguous
    index_ptr,  # (num_rows, F) int32/int64, contiguous; -1 = no feature
    mode_ptr,  # (num_rows, F) int8/int32, contiguous; 0 add, 1 clamp
    value_ptr,  # (num_rows, F) fp32, contiguous
    mask_ptr,  # (num_rows, seq) uint8 (a bool view); unused without HAS_MASK
    seq_len,
    hidden_size,
    num_features,
    stride_hidden_row,
    stride_hidden_pos,
    stride_enc,
    stride_dec,
    F: tl.constexpr,
    F_POW2: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    # One program per (row, position): x sits in registers, since each feature needs a
    # full dot product with it. int64 so that row * stride cannot overflow on long prefills.
    pid = tl.program_id(0).to(tl.int64)
    row = pid // seq_len
    pos = pid % seq_len

    slots = tl.arange(0, F_POW2)
    slot_index = tl.load(index_ptr + row * F + slots, mask=slots < F, other=-1)
    slot_mode = tl.load(mode_ptr + row * F + slots, mask=slots < F, other=-1).to(tl.int32)
    # Out-of-range indices and unknown modes are "no feature" (as in the reference), so a
    # caller bug can neither fault memory nor touch the row.
    slot_ok = (slot_index >= 0) & (slot_index < num_features) & (slot_mode >= 0)
    slot_ok = slot_ok & (slot_mode <= 1)
    active = tl.sum(slot_ok.to(tl.int32), axis=0) > 0
    if HAS_MASK:
        active = active & (tl.load(mask_ptr + row * seq_len + pos) != 0)

    # Inactive (row, position) pairs are neither read nor written: bit-identical by design.
    if active:
        offs = tl.arange(0, BLOCK_H)
        in_bounds = offs < hidden_size
        h_ptrs = hidden_ptr + row * stride_hidden_row + pos * stride_hidden_pos + offs
        x = tl.load(h_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
        delta = tl.zeros((BLOCK_H,), dtype=tl.float32)

        # Every feature is encoded from the original x (SAELens encodes once, then decodes
        # the edit's difference); unrolled, F is small.
        for f in tl.static_range(F):
            index = tl.load(index_ptr + row * F + f).to(tl.int64)
            mode = tl.load(mode_ptr + row * F + f).to(tl.int32)
            value = tl.load(value_ptr + row * F + f)
            ok = (index >= 0) & (index < num_features) & (mode >= 0) & (mode <= 1)
            safe_index = tl.where(ok, index, 0)  # U >= 1 here: row 0 always exists
            # An absent slot loads no vector: its mask is empty. Built from one compare
            # because `in_bounds & ok` (vector & scalar) gives ints under the interpreter.
            limit = tl.where(ok, hidden_size, 0)
            enc = tl.load(enc_ptr + safe_index * stride_enc + offs, mask=offs < limit, other=0.0)
            dec = tl.load(dec_ptr + safe_index * stride_dec + offs, mask=offs < limit, other=0.0)
            pre = tl.sum(x * enc, axis=0) + tl.load(bias_ptr + safe_index)
            act = tl.where(pre > tl.load(threshold_ptr + safe_index), pre, 0.0)  # JumpReLU
            coef = tl.where(mode == 0, value, value - act)
            # where, not coef * 0: an absent slot's NaN/inf value must not reach delta.
            delta = tl.where(ok, delta + coef * dec, delta)

        tl.store(h_ptrs, (x + delta).to(hidden_ptr.dtype.element_ty), mask=in_bounds)
