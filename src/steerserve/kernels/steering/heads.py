"""Triton kernel: per-row attention-head offsets (ITI / LoFiT) for one layer, one launch.

Imports triton at module level; `kernels.steering` imports this module lazily, so that
`import kernels.steering` works without triton and TRITON_INTERPRET is read at first use.
Validation and the PyTorch reference live in `kernels.steering`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def steer_heads_kernel(
    attn_ptr,  # (num_rows, seq, num_heads * head_dim), last dim contiguous; in place
    offsets_ptr,  # (num_offsets, num_heads * head_dim) view, contiguous
    index_ptr,  # (num_rows,) int32/int64; -1 = no offsets for this row
    scale_ptr,  # (num_rows,) fp32
    mask_ptr,  # (num_rows, seq) uint8 (a bool view); unused without HAS_MASK
    seq_len,
    width,  # num_heads * head_dim
    num_offsets,
    stride_attn_row,
    stride_attn_pos,
    BLOCK: tl.constexpr,
    HAS_MASK: tl.constexpr,
):
    # Grid: (row * seq + pos, chunk of the flattened head dimension). Pure elementwise, so
    # chunks are independent and large widths need no special handling.
    # int64 so that row * stride cannot overflow on long prefills.
    pid = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    row = pid // seq_len
    pos = pid % seq_len

    index = tl.load(index_ptr + row).to(tl.int64)
    # Out-of-range indices are treated as "none" so a caller bug cannot fault memory.
    active = (index >= 0) & (index < num_offsets)
    if HAS_MASK:
        active = active & (tl.load(mask_ptr + row * seq_len + pos) != 0)

    # Inactive (row, position) pairs are neither read nor written: bit-identical by design.
    if active:
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        in_bounds = offs < width
        a_ptrs = attn_ptr + row * stride_attn_row + pos * stride_attn_pos + offs
        a = tl.load(a_ptrs, mask=in_bounds, other=0.0)
        off = tl.load(offsets_ptr + index * width + offs, mask=in_bounds, other=0.0)
        off = off.to(tl.float32)
        scale = tl.load(scale_ptr + row)
        # Zero offsets (unsteered heads) keep the input bits exactly (even -0.0).
        steered = (a.to(tl.float32) + scale * off).to(a.dtype)
        tl.store(a_ptrs, tl.where(off != 0.0, steered, a), mask=in_bounds)
