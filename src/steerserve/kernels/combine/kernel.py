"""Triton kernels: combine decoding lanes' logits into one row per request (two launches).

1. `lane_stats_kernel`, one program per lane: max and logsumexp of z / T over the vocabulary.
2. `combine_kernel`, grid (request rows, vocabulary blocks): the weighted sum of the row's lanes
   (raw or log-softmaxed), -inf where a used lane has -inf or outside the plausible set.

Imports triton at module level; `kernels.combine` imports this module lazily, so that importing
the op works without triton and TRITON_INTERPRET is read at first use. Validation, the PyTorch
reference and the semantics live in `kernels.combine`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lane_stats_kernel(
    logits_ptr,  # (num_lanes, vocab) fp32, contiguous
    temperature_ptr,  # (num_lanes,) fp32 > 0
    max_ptr,  # (num_lanes,) fp32 out: max_v z / T (-inf for an all -inf lane)
    lse_ptr,  # (num_lanes,) fp32 out: logsumexp_v z / T (-inf for an all -inf lane)
    vocab_size,
    BLOCK: tl.constexpr,
):
    # Online logsumexp, per position of the block: running max m and s = sum exp(x - m).
    lane = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + lane * vocab_size  # int64: lanes * 150k may overflow int32
    temp = tl.load(temperature_ptr + lane)
    offs = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, vocab_size, BLOCK):
        in_bounds = start + offs < vocab_size
        x = tl.load(row_ptr + start + offs, mask=in_bounds, other=float("-inf")) / temp
        m_new = tl.maximum(m, x)
        ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # finite: exp(-inf - ref) = 0, no NaN
        s = s * tl.exp(m - ref) + tl.exp(x - ref)
        m = m_new

    big_m = tl.max(m, axis=0)
    ref = tl.where(big_m > float("-inf"), big_m, 0.0)
    total = tl.sum(s * tl.exp(m - ref), axis=0)
    safe_total = tl.where(total > 0.0, total, 1.0)  # 0 only for an all -inf lane: no log(0)
    lse = tl.where(big_m > float("-inf"), ref + tl.log(safe_total), float("-inf"))
    tl.store(max_ptr + lane, big_m)
    tl.store(lse_ptr + lane, lse)


@triton.jit
def combine_kernel(
    logits_ptr,  # (num_lanes, vocab) fp32, contiguous
    temperature_ptr,  # (num_lanes,) fp32 > 0
    lane_max_ptr,  # (num_lanes,) fp32: from lane_stats_kernel
    lane_lse_ptr,  # (num_lanes,) fp32: from lane_stats_kernel
    lane_index_ptr,  # (num_rows, SLOTS) int32: lanes per row; outside [0, num_lanes) = unused
    weight_ptr,  # (num_rows, SLOTS) fp32
    log_softmax_ptr,  # (num_rows,) bool
    plausible_lane_ptr,  # (num_rows,) int32: outside [0, num_lanes) = no mask
    log_alpha_ptr,  # (num_rows,) fp32: log(plausible_alpha), taken on the host like the reference
    out_ptr,  # (num_rows, vocab) fp32 out
    num_lanes,
    vocab_size,
    SLOTS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < vocab_size
    use_lsm = tl.load(log_softmax_ptr + row) != 0  # bool memory is bytes

    # Scalar conditions become branches, not load masks: no memory traffic for absent slots
    # (and the interpreter cannot splat a scalar condition into a block mask).
    acc = tl.zeros((BLOCK,), tl.float32)
    impossible = tl.zeros((BLOCK,), tl.int1)  # -inf in some present lane
    for slot in tl.static_range(SLOTS):
        lane = tl.load(lane_index_ptr + row * SLOTS + slot)
        weight = tl.load(weight_ptr + row * SLOTS + slot)
        # Weight 0 means absent: 0 * -inf would be NaN.
        if (lane >= 0) & (lane < num_lanes) & (weight != 0.0):
            lane64 = lane.to(tl.int64)  # a new name: a branch may not change a variable's type
            lse = tl.load(lane_lse_ptr + lane64)
            shift = tl.where(use_lsm & (lse > float("-inf")), lse, 0.0)  # all -inf lane: no NaN
            x = tl.load(logits_ptr + lane64 * vocab_size + offs, mask=in_bounds, other=0.0)
            x = x / tl.load(temperature_ptr + lane64)
            neg = x == float("-inf")
            impossible = impossible | neg
            acc += tl.where(neg, 0.0, weight * (x - shift))

    # Plausible set on the plausible lane's z / T: keep v iff z_v / T >= max / T + log(alpha).
    implausible = tl.zeros((BLOCK,), tl.int1)
    p_lane = tl.load(plausible_lane_ptr + row)
    if (p_lane >= 0) & (p_lane < num_lanes):
        p_lane64 = p_lane.to(tl.int64)
        threshold = tl.load(lane_max_ptr + p_lane64) + tl.load(log_alpha_ptr + row)
        p = tl.load(logits_ptr + p_lane64 * vocab_size + offs, mask=in_bounds, other=0.0)
        p = p / tl.load(temperature_ptr + p_lane64)
        implausible = (p == float("-inf")) | (p < threshold)

    out = tl.where(impossible | implausible, float("-inf"), acc)
    tl.store(out_ptr + row * vocab_size + offs, out, mask=in_bounds)
