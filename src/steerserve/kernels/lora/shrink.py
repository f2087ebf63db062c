"""Triton kernels for the LoRA shrink step, t = x @ A[slot]^T, batched over adapters.

Imported lazily by `kernels.lora` (this module imports triton at the top). Inputs are
validated there; the launchers here only pick block sizes and launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from steerserve.kernels.dispatch import triton_interpreting


@triton.jit
def _shrink_bgmv_kernel(
    x_ptr, a_ptr, idx_ptr, t_ptr,
    K, R, num_slots, k_per_split,
    stride_xm, stride_as, stride_ar, stride_ts, stride_tm,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program: one row, one block of rank, one K split (decode: GEMV per row).
    row = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    slot = tl.load(idx_ptr + row).to(tl.int64)
    # -1 means "no adapter"; out-of-range slots are skipped too, for memory safety.
    if (slot < 0) | (slot >= num_slots):
        return
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    r_mask = offs_r < R
    # 64-bit scalar bases, 32-bit tile offsets: 64-bit offset tensors double register use.
    x_row = x_ptr + row * stride_xm
    a_rows = a_ptr + slot * stride_as + offs_r[:, None] * stride_ar  # (BR, 1)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        k_mask = offs_k < K
        xv = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)  # (BK,)
        av = tl.load(a_rows + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :],
                     other=0.0).to(tl.float32)  # (BR, BK)
        acc += tl.sum(av * xv[None, :], axis=1)
    t_ptrs = t_ptr + (pid_k * stride_ts + row * stride_tm) + offs_r
    tl.store(t_ptrs, acc.to(t_ptr.dtype.element_ty), mask=r_mask)


@triton.jit
def _shrink_sgmv_kernel(
    x_ptr, a_ptr, starts_ptr, seg_slot_ptr, t_ptr,
    K, R, num_slots,
    stride_xm, stride_as, stride_ar, stride_tm,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # One program: BLOCK_M rows of one segment x one block of rank (prefill: a small GEMM).
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    pid_r = tl.program_id(2)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    start = tl.load(starts_ptr + seg).to(tl.int64)
    end = tl.load(starts_ptr + seg + 1).to(tl.int64)
    m0 = start + pid_m * BLOCK_M
    # The grid is sized for the longest segment; shorter ones leave programs idle.
    if (slot < 0) | (slot >= num_slots) | (m0 >= end):
        return
    offs_m = tl.arange(0, BLOCK_M)  # (BM,) rows from m0
    m_mask = offs_m < (end - m0).to(tl.int32)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    r_mask = offs_r < R
    # 64-bit scalar bases, 32-bit tile offsets: 64-bit offset tensors double register use.
    x_rows = x_ptr + m0 * stride_xm + offs_m[:, None] * stride_xm  # (BM, 1)
    a_cols = a_ptr + slot * stride_as + offs_r[None, :] * stride_ar  # (1, BR)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        k_mask = offs_k < K
        xt = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                     other=0.0)  # (BM, BK)
        at = tl.load(a_cols + offs_k[:, None], mask=k_mask[:, None] & r_mask[None, :],
                     other=0.0)  # (BK, BR) = A[slot]^T tile
        if UPCAST_DOT:  # the interpreter cannot tl.dot bfloat16 (triton#11584)
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
    t_ptrs = t_ptr + m0 * stride_tm + offs_m[:, None] * stride_tm + offs_r[None, :]
    tl.store(t_ptrs, acc.to(t_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


def pow2_clamp(n: int, lo: int, hi: int) -> int:
    """next_power_of_2(n) clamped to [lo, hi] (tl.arange needs powers of two)."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through TF32 (10-bit mantissa) on tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and triton_interpreting()


def rank_block(rank: int) -> int:
    # tl.dot needs every block dimension >= 16; ranks above 64 loop / add grid blocks.
    return pow2_clamp(rank, 16, 64)


def _split_k(num_rows: int, r_blocks: int, k: int, block_k: int) -> int:
    """Split K across programs when there are too few rows to fill the GPU (small decode)."""
    if triton_interpreting():
        return 1  # the interpreter runs programs one after another: splitting only costs time
    target_programs = 256  # ~2 waves on a 132-SM H100
    return max(1, min(triton.cdiv(k, block_k), target_programs // max(1, num_rows * r_blocks), 32))


def shrink_bgmv(
    x: torch.Tensor, lora_a: torch.Tensor, adapter_index: torch.Tensor,
    split_k: int | None = None,
) -> torch.Tensor:
    """t = x @ A[idx]^T per row; inputs already validated. split_k=None picks one."""
    num_rows, k = x.shape
    num_slots, rank, _ = lora_a.shape
    t = x.new_zeros((num_rows, rank))  # (N, R); rows without an adapter stay zero
    if num_rows == 0 or rank == 0 or k == 0 or num_slots == 0:
        return t
    if triton_interpreting():  # few, large programs: per-program overhead dominates
        block_r, block_k = rank_block(rank), pow2_clamp(k, 16, 1024)
    else:  # 16 x 256 tiles stay near 96 registers on sm_90; larger ranks add grid blocks
        block_r, block_k = 16, pow2_clamp(k, 16, 256)
    r_blocks = triton.cdiv(rank, block_r)
    if split_k is None:
        split_k = _split_k(num_rows, r_blocks, k, block_k)
    split_k = max(1, min(split_k, triton.cdiv(k, block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, block_k), split_k) * block_k
    if split_k == 1:
        partials = t.unsqueeze(0)  # (1, N, R): a view, the kernel writes t directly
    else:  # fp32 partials summed by torch afterwards: deterministic, unlike atomics
        partials = x.new_zeros((split_k, num_rows, rank), dtype=torch.float32)  # (S_k, N, R)
    _shrink_bgmv_kernel[(num_rows, r_blocks, split_k)](
        x, lora_a, adapter_index, partials,
        k, rank, num_slots, k_per_split,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), partials.stride(0), partials.stride(1),
        BLOCK_R=block_r, BLOCK_K=block_k,
    )
    if split_k > 1:
        t.copy_(partials.sum(dim=0))
    return t


def row_block(max_rows: int) -> int:
    return pow2_clamp(max_rows, 16, 128 if triton_interpreting() else 64)


def shrink_sgmv(
    x: torch.Tensor, lora_a: torch.Tensor, segment_starts: torch.Tensor,
    segment_adapter: torch.Tensor, max_segment_len: int | None = None,
) -> torch.Tensor:
    """t = x @ A[slot]^T per segment of rows; inputs already validated."""
    num_rows, k = x.shape
    num_slots, rank, _ = lora_a.shape
    num_segments = segment_adapter.shape[0]
    t = x.new_zeros((num_rows, rank))  # (N, R); rows outside adapter segments stay zero
    # Without a hint, bound every segment by num_rows: correct, no device->host sync.
    bound = num_rows if max_segment_len is None else min(max_segment_len, num_rows)
    if bound <= 0 or rank == 0 or k == 0 or num_slots == 0 or num_segments == 0:
        return t
    block_m = row_block(bound)
    block_r = rank_block(rank)
    block_k = pow2_clamp(k, 16, 512 if triton_interpreting() else 64)
    grid = (triton.cdiv(bound, block_m), num_segments, triton.cdiv(rank, block_r))
    _shrink_sgmv_kernel[grid](
        x, lora_a, segment_starts, segment_adapter, t,
        k, rank, num_slots,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), t.stride(0),
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        PRECISION=dot_precision(x.dtype), UPCAST_DOT=upcast_dot(x.dtype),
    )
    return t
