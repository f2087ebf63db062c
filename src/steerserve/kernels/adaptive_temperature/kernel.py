"""Triton kernel: per-row adaptive temperature (fixed / EDT / dynatemp / given), in one launch.

Imports triton at module level; `kernels.adaptive_temperature` imports this module lazily, so
that importing the op works without triton and TRITON_INTERPRET is read at first use.
Validation, the PyTorch reference and the semantics live in `kernels.adaptive_temperature`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _pow_nonneg(x, e):
    # x ** e for x >= 0 with C powf's zero cases: 0 ** 0 = 1, 0 ** (e > 0) = 0, 0 ** (e < 0) = inf.
    # x is clamped away from 0 under the log so that the unused branch computes no -inf * 0.
    positive = tl.exp2(e * tl.log2(tl.where(x > 0.0, x, 1.0)))
    at_zero = tl.where(e == 0.0, 1.0, tl.where(e > 0.0, 0.0, float("inf")))
    return tl.where(x > 0.0, positive, at_zero)


@triton.jit
def _row_entropy(row_ptr, vocab_size, BLOCK: tl.constexpr):
    """(H, number of candidates) of softmax(row); -inf entries are not candidates.

    One pass, online per lane: lane i keeps its running max m_i, z_i = sum exp(x - m_i) and
    s_i = sum exp(x - m_i) * (x - m_i) over its candidates. Then with M = max m_i,
    Z = sum exp(m_i - M) z_i and S = sum exp(m_i - M) (s_i + (m_i - M) z_i), and
    H = log Z - S / Z: a sum of non-negative terms (S <= 0), so no cancellation.
    """
    offs = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    z = tl.zeros((BLOCK,), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    count = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, vocab_size, BLOCK):
        x = tl.load(row_ptr + start + offs, mask=start + offs < vocab_size, other=float("-inf"))
        cand = x > float("-inf")
        m_new = tl.maximum(m, x)
        ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # finite, so x - ref is never NaN
        # Lanes that had no candidate yet have z = s = 0: rescale them by 0, not exp(nan).
        had = m > float("-inf")
        scale = tl.where(had, tl.exp(tl.where(had, m - ref, 0.0)), 0.0)
        shift = tl.where(had, m - ref, 0.0)
        d = tl.where(cand, x - ref, 0.0)
        e = tl.where(cand, tl.exp(d), 0.0)  # 0 * -inf is NaN: masked tokens contribute 0
        s = scale * (s + shift * z) + e * d
        z = scale * z + e
        m = m_new
        count += cand.to(tl.int32)

    big_m = tl.max(m, axis=0)
    ref = tl.where(big_m > float("-inf"), big_m, 0.0)
    had = m > float("-inf")
    scale = tl.where(had, tl.exp(tl.where(had, m - ref, 0.0)), 0.0)
    shift = tl.where(had, m - ref, 0.0)
    total_z = tl.sum(scale * z, axis=0)
    total_s = tl.sum(scale * (s + shift * z), axis=0)
    safe_z = tl.where(total_z > 0.0, total_z, 1.0)
    entropy = tl.where(total_z > 0.0, tl.log(safe_z) - total_s / safe_z, 0.0)
    return entropy, tl.sum(count, axis=0)


@triton.jit
def _edt_temperature(t0, theta, base, entropy):
    # T0 * N ** (theta / H); H = 0 gives the limit 0 (greedy) for 0 < N < 1, theta > 0.
    safe_h = tl.where(entropy > 0.0, entropy, 1.0)
    temp = t0 * tl.exp2(theta / safe_h * tl.log2(base))
    return tl.where(entropy > 0.0, temp, 0.0)


@triton.jit
def _dynatemp_temperature(t0, spread, exponent, entropy, count):
    # llama.cpp temp-ext: Tmin + (Tmax - Tmin) * (H / ln(#candidates)) ** exponent;
    # plain t0 when the range is off or there are fewer than two candidates.
    t_min = tl.maximum(t0 - spread, 0.0)
    t_max = t0 + spread
    active = (spread > 0.0) & (count > 1)
    max_entropy = tl.log(tl.where(active, count, 2).to(tl.float32))
    temp = t_min + (t_max - t_min) * _pow_nonneg(entropy / max_entropy, exponent)
    return tl.where(active, temp, t0)


@triton.jit
def adaptive_temperature_kernel(
    logits_ptr,  # (num_rows, vocab) fp32, contiguous; scaled in place
    method_ptr,  # (num_rows,) int8/int32: 0 fixed, 1 EDT, 2 dynatemp, 3 given
    t0_ptr,  # (num_rows,) fp32
    param_a_ptr,  # (num_rows,) fp32: EDT theta / dynatemp range
    param_b_ptr,  # (num_rows,) fp32: EDT N / dynatemp exponent
    temp_ptr,  # (num_rows,) fp32 out: the temperature used
    vocab_size,
    BLOCK: tl.constexpr,
):
    # One program per row: two reads of the row (statistics, then scaling), one write.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * vocab_size  # int64: rows * 150k overflows int32
    method = tl.load(method_ptr + row).to(tl.int32)
    t0 = tl.load(t0_ptr + row)
    param_a = tl.load(param_a_ptr + row)
    param_b = tl.load(param_b_ptr + row)

    temp = t0  # fixed, given, and (as in the reference) unknown method codes
    if (method == 1) | (method == 2):  # only these need the entropy
        entropy, count = _row_entropy(row_ptr, vocab_size, BLOCK)
        if method == 1:
            temp = _edt_temperature(t0, param_a, param_b, entropy)
        else:
            temp = _dynatemp_temperature(t0, param_a, param_b, entropy, count)
    tl.store(temp_ptr + row, temp)

    # T <= 0 (greedy) or NaN: the row is left as is for the sampler's argmax.
    if temp > 0.0:
        offs = tl.arange(0, BLOCK)
        for start in range(0, vocab_size, BLOCK):
            in_bounds = start + offs < vocab_size
            x = tl.load(row_ptr + start + offs, mask=in_bounds)
            tl.store(row_ptr + start + offs, x / temp, mask=in_bounds)
