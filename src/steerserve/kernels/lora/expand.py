"""Triton kernels for the LoRA expand step, y += scale[slot] * t @ B[slot]^T, in place.

Imported lazily by `kernels.lora` (this module imports triton at the top). Inputs are
validated there; the launchers here only pick block sizes and launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steerserve.kernels.dispatch import triton_interpreting
from steerserve.kernels.lora.shrink import (
    dot_precision,
    pow2_clamp,
    rank_block,
    row_block,
    upcast_dot,
)


@triton.jit
def _expand_bgmv_kernel(
    t_ptr, b_ptr, idx_ptr, scale_ptr, y_ptr,
    N_OUT, R, num_slots,
    stride_tm, stride_bs, stride_bn, stride_ym,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program: one row x one block of output features (decode: GEMV per row).
    row = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    slot = tl.load(idx_ptr + row).to(tl.int64)
    # -1 means "no adapter": the row of y is not even read or written.
    if (slot < 0) | (slot >= num_slots):
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    n_mask = offs_n < N_OUT
    # 64-bit scalar bases, 32-bit tile offsets: 64-bit offset tensors double register use.
    t_row = t_ptr + row * stride_tm
    b_rows = b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn  # (BN, 1)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)  # (BR,)
        r_mask = offs_r < R
        tv = tl.load(t_row + offs_r, mask=r_mask, other=0.0).to(tl.float32)
        bv = tl.load(b_rows + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :],
                     other=0.0).to(tl.float32)  # (BN, BR)
        acc += tl.sum(bv * tv[None, :], axis=1)
    scale = tl.load(scale_ptr + slot)
    y_ptrs = y_ptr + row * stride_ym + offs_n
    y = tl.load(y_ptrs, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc * scale).to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _expand_sgmv_kernel(
    t_ptr, b_ptr, starts_ptr, seg_slot_ptr, scale_ptr, y_ptr,
    N_OUT, R, num_slots,
    stride_tm, stride_bs, stride_bn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # One program: BLOCK_M rows of one segment x BLOCK_N output features (prefill GEMM).
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    pid_n = tl.program_id(2)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    start = tl.load(starts_ptr + seg).to(tl.int64)
    end = tl.load(starts_ptr + seg + 1).to(tl.int64)
    m0 = start + pid_m * BLOCK_M
    # The grid is sized for the longest segment; shorter ones leave programs idle.
    if (slot < 0) | (slot >= num_slots) | (m0 >= end):
        return
    offs_m = tl.arange(0, BLOCK_M)  # (BM,) rows from m0
    m_mask = offs_m < (end - m0).to(tl.int32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    n_mask = offs_n < N_OUT
    # 64-bit scalar bases, 32-bit tile offsets: 64-bit offset tensors double register use.
    t_rows = t_ptr + m0 * stride_tm + offs_m[:, None] * stride_tm  # (BM, 1)
    b_cols = b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn  # (1, BN)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)  # (BR,)
        r_mask = offs_r < R
        tt = tl.load(t_rows + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                     other=0.0)  # (BM, BR)
        bt = tl.load(b_cols + offs_r[:, None], mask=r_mask[:, None] & n_mask[None, :],
                     other=0.0)  # (BR, BN) = B[slot]^T tile
        if UPCAST_DOT:  # the interpreter cannot tl.dot bfloat16 (triton#11584)
            tt = tt.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(tt, bt, acc, input_precision=PRECISION)
    scale = tl.load(scale_ptr + slot)
    y_ptrs = y_ptr + m0 * stride_ym + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc * scale).to(y_ptr.dtype.element_ty), mask=mask)


def expand_bgmv(
    t: torch.Tensor, lora_b: torch.Tensor, adapter_index: torch.Tensor,
    scaling: torch.Tensor, y: torch.Tensor,
) -> None:
    """y[i] += scaling[idx[i]] * B[idx[i]] @ t[i] in place; inputs already validated."""
    num_rows, rank = t.shape
    num_slots, n_out, _ = lora_b.shape
    if num_rows == 0 or rank == 0 or n_out == 0 or num_slots == 0:
        return
    block_r = rank_block(rank)
    # Interpreter: few, large programs. GPU: 4096-element B tiles (~64 registers on sm_90).
    hi_n = 1024 if triton_interpreting() else 4096 // block_r
    block_n = pow2_clamp(n_out, 16, hi_n)
    _expand_bgmv_kernel[(num_rows, triton.cdiv(n_out, block_n))](
        t, lora_b, adapter_index, scaling, y,
        n_out, rank, num_slots,
        t.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        BLOCK_N=block_n, BLOCK_R=block_r,
    )


def expand_sgmv(
    t: torch.Tensor, lora_b: torch.Tensor, segment_starts: torch.Tensor,
    segment_adapter: torch.Tensor, scaling: torch.Tensor, y: torch.Tensor,
    max_segment_len: int | None = None,
) -> None:
    """y += scaling[slot] * t @ B[slot]^T per segment, in place; inputs already validated."""
    num_rows, rank = t.shape
    num_slots, n_out, _ = lora_b.shape
    num_segments = segment_adapter.shape[0]
    # Without a hint, bound every segment by num_rows: correct, no device->host sync.
    bound = num_rows if max_segment_len is None else min(max_segment_len, num_rows)
    if bound <= 0 or rank == 0 or n_out == 0 or num_slots == 0 or num_segments == 0:
        return
    block_m = row_block(bound)
    block_n = pow2_clamp(n_out, 16, 256 if triton_interpreting() else 64)
    block_r = rank_block(rank)
    grid = (triton.cdiv(bound, block_m), num_segments, triton.cdiv(n_out, block_n))
    _expand_sgmv_kernel[grid](
        t, lora_b, segment_starts, segment_adapter, scaling, y,
        n_out, rank, num_slots,
        t.stride(0), lora_b.stride(0), lora_b.stride(1), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
        PRECISION=dot_precision(t.dtype), UPCAST_DOT=upcast_dot(t.dtype),
    )
