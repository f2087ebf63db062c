"""Combine decoding lanes' next-token logits into one row per request (multi-model decoding).

A request is decoded by several lanes (proxy-tuning: base, expert, anti-expert; contrastive:
expert, amateur; SH2: ponder, orig; DoLa: mature, premature layer). The engine stacks every
lane's logits of a step into `lane_logits` (L, V) and gets one (R, V) row per request:

    out[r] = sum_m weight[r, m] * f(lane_logits[lane_index[r, m]] / lane_temperature[lane])

with f = log_softmax over V if `log_softmax[r]`, else identity. Rules:

* Slots whose lane index is outside [0, L) (-1 by convention) or whose weight is 0 are absent
  (so 0 * -inf never makes a NaN). A lane may appear in several slots; the terms add up.
  A row without any present slot sums to 0.
* A -inf entry of a present lane (a masked token) makes the output -inf for that token, whatever
  the sign of the weight: the token is impossible in some lane. log_softmax keeps -inf entries
  -inf, also in an all -inf lane (no NaN).
* Plausible set (relative top, Li et al. 2022): if 0 <= plausible_lane[r] < L, with
  x = lane_logits[p] / lane_temperature[p], token v is kept iff x_v > -inf and
  x_v >= max_u x_u + log(plausible_alpha[r]), i.e. p(v) >= alpha * max p without a softmax.
  The max token always stays; alpha = 1 keeps only the argmax (ties all kept). Other tokens get
  -inf. The mask applies also to a row without present slots (zeros inside the set).

Not checked, because that would read device values (a sync): temperatures > 0, 0 < alpha <= 1,
finite weights, and logits without NaN or +inf. Outside that range the formulas apply as is.

`combine_lanes_torch` is the reference (loops over rows, the tests' oracle),
`combine_lanes_dense` a vectorized PyTorch version (the CPU path), `combine_lanes_triton` the
launcher (two kernels, in `kernels.combine_kernel`, imported lazily). All three have the same
signature and contract; `combine_lanes` picks Triton or dense once per device type.
"""

from __future__ import annotations

import torch

from steerserve.kernels import dispatch
from steerserve.kernels.checks import check_tensor, require

__all__ = [
    "BLOCK_V",
    "MAX_SLOTS",
    "combine_lanes",
    "combine_lanes_dense",
    "combine_lanes_torch",
    "combine_lanes_triton",
]

# Vocabulary chunk per program / loop step in the kernels (tests lower it: the interpreter is slow).
BLOCK_V = 1024
# Most lanes one request row combines (the kernel unrolls over them).
MAX_SLOTS = 8

NEG_INF = float("-inf")

# Backend decided once per device type, logged once.


# --------------------------------------------------------------------------- validation


def _check_args(
    lane_logits: torch.Tensor,
    lane_temperature: torch.Tensor,
    lane_index: torch.Tensor,
    weight: torch.Tensor,
    log_softmax: torch.Tensor,
    plausible_lane: torch.Tensor,
    plausible_alpha: torch.Tensor,
) -> None:
    require(isinstance(lane_logits, torch.Tensor), "lane_logits must be a torch.Tensor")
    require(lane_logits.dim() == 2, f"lane_logits must be 2-D (L, V), got {lane_logits.dim()}-D")
    require(isinstance(lane_index, torch.Tensor), "lane_index must be a torch.Tensor")
    require(lane_index.dim() == 2, f"lane_index must be 2-D (R, M), got {lane_index.dim()}-D")
    num_lanes, device = lane_logits.shape[0], lane_logits.device
    num_rows, slots = lane_index.shape
    require(slots <= MAX_SLOTS, f"lane_index has {slots} slots per row, at most {MAX_SLOTS}")
    f32, i32 = (torch.float32,), (torch.int32,)
    check_tensor("lane_logits", lane_logits, tuple(lane_logits.shape), f32, device)
    check_tensor("lane_temperature", lane_temperature, (num_lanes,), f32, device)
    check_tensor("lane_index", lane_index, (num_rows, slots), i32, device)
    check_tensor("weight", weight, (num_rows, slots), f32, device)
    check_tensor("log_softmax", log_softmax, (num_rows,), (torch.bool,), device)
    check_tensor("plausible_lane", plausible_lane, (num_rows,), i32, device)
    check_tensor("plausible_alpha", plausible_alpha, (num_rows,), f32, device)


# --------------------------------------------------------------------------- reference


def _log_softmax_keep_neg_inf(x: torch.Tensor) -> torch.Tensor:  # (..., V) -> (..., V)
    # An all -inf row would give NaN; its tokens are all impossible: -inf.
    return torch.where(x == NEG_INF, NEG_INF, torch.log_softmax(x, dim=-1))


def _implausible(
    scaled: torch.Tensor,  # (..., V) fp32: the plausible lane's z / T
    log_alpha: torch.Tensor,  # (...) or () fp32
) -> torch.Tensor:  # (..., V) bool
    threshold = scaled.amax(dim=-1) + log_alpha  # (...)
    return (scaled == NEG_INF) | (scaled < threshold.unsqueeze(-1))


def combine_lanes_torch(
    lane_logits: torch.Tensor,  # (L, V) fp32, contiguous
    lane_temperature: torch.Tensor,  # (L,) fp32 > 0
    lane_index: torch.Tensor,  # (R, M) int32, M <= 8: lanes per row; -1 = unused slot
    weight: torch.Tensor,  # (R, M) fp32
    log_softmax: torch.Tensor,  # (R,) bool: combine log-softmaxes, else scaled logits
    plausible_lane: torch.Tensor,  # (R,) int32: lane of the plausible set; -1 = no mask
    plausible_alpha: torch.Tensor,  # (R,) fp32 in (0, 1]
) -> torch.Tensor:  # (R, V) fp32
    """Reference: row by row, slot by slot (see the module docstring)."""
    args = (lane_logits, lane_temperature, lane_index, weight, log_softmax, plausible_lane,
            plausible_alpha)  # fmt: skip
    _check_args(*args)
    (num_lanes, vocab), num_rows = lane_logits.shape, lane_index.shape[0]
    out = torch.zeros(num_rows, vocab, dtype=torch.float32, device=lane_logits.device)
    for row in range(num_rows):
        impossible = torch.zeros(vocab, dtype=torch.bool, device=out.device)  # (V,)
        for lane, w in zip(lane_index[row].tolist(), weight[row], strict=True):
            if not 0 <= lane < num_lanes or w == 0:
                continue  # absent slot
            values = lane_logits[lane] / lane_temperature[lane]  # (V,)
            if log_softmax[row]:
                values = _log_softmax_keep_neg_inf(values)
            impossible |= values == NEG_INF
            out[row] += torch.where(values == NEG_INF, 0.0, w * values)
        lane = int(plausible_lane[row])
        if 0 <= lane < num_lanes:
            scaled = lane_logits[lane] / lane_temperature[lane]
            impossible |= _implausible(scaled, torch.log(plausible_alpha[row]))
        out[row] = torch.where(impossible, NEG_INF, out[row])
    return out


def combine_lanes_dense(
    lane_logits: torch.Tensor,  # (L, V) fp32, contiguous
    lane_temperature: torch.Tensor,  # (L,) fp32 > 0
    lane_index: torch.Tensor,  # (R, M) int32, M <= 8: lanes per row; -1 = unused slot
    weight: torch.Tensor,  # (R, M) fp32
    log_softmax: torch.Tensor,  # (R,) bool: combine log-softmaxes, else scaled logits
    plausible_lane: torch.Tensor,  # (R,) int32: lane of the plausible set; -1 = no mask
    plausible_alpha: torch.Tensor,  # (R,) fp32 in (0, 1]
) -> torch.Tensor:  # (R, V) fp32
    """Same contract as `combine_lanes_torch`, vectorized over rows (a loop over the M slots)."""
    args = (lane_logits, lane_temperature, lane_index, weight, log_softmax, plausible_lane,
            plausible_alpha)  # fmt: skip
    _check_args(*args)
    (num_lanes, vocab), (num_rows, slots) = lane_logits.shape, lane_index.shape
    out = torch.zeros(num_rows, vocab, dtype=torch.float32, device=lane_logits.device)
    if num_lanes == 0 or vocab == 0:
        return out  # no lane can be present, no mask: zeros (or nothing)

    scaled = lane_logits / lane_temperature.unsqueeze(-1)  # (L, V)
    lsm = _log_softmax_keep_neg_inf(scaled)  # (L, V); computed for all lanes: no sync to check
    which = log_softmax.long()  # (R,): 0 raw, 1 log-softmax
    choices = torch.stack([scaled, lsm]).flatten(0, 1)  # (2 L, V): row which * L + lane
    impossible = torch.zeros(num_rows, vocab, dtype=torch.bool, device=out.device)
    for slot in range(slots):  # rows in parallel, slots in order (as the reference adds them)
        lane, w = lane_index[:, slot].long(), weight[:, slot]  # (R,), (R,)
        present = (lane >= 0) & (lane < num_lanes) & (w != 0)  # (R,)
        safe = torch.where(present, lane, 0)
        values = choices[which * num_lanes + safe]  # (R, V)
        neg = present.unsqueeze(-1) & (values == NEG_INF)  # (R, V)
        impossible |= neg
        term = torch.where(present, w, 0.0).unsqueeze(-1) * values
        out += torch.where(neg | ~present.unsqueeze(-1), 0.0, term)

    p_lane = plausible_lane.long()
    has_mask = (p_lane >= 0) & (p_lane < num_lanes)  # (R,)
    implausible = _implausible(scaled[torch.where(has_mask, p_lane, 0)], plausible_alpha.log())
    impossible |= has_mask.unsqueeze(-1) & implausible
    return torch.where(impossible, NEG_INF, out)


def combine_lanes_triton(
    lane_logits: torch.Tensor,  # (L, V) fp32, contiguous
    lane_temperature: torch.Tensor,  # (L,) fp32 > 0
    lane_index: torch.Tensor,  # (R, M) int32, M <= 8: lanes per row; -1 = unused slot
    weight: torch.Tensor,  # (R, M) fp32
    log_softmax: torch.Tensor,  # (R,) bool: combine log-softmaxes, else scaled logits
    plausible_lane: torch.Tensor,  # (R,) int32: lane of the plausible set; -1 = no mask
    plausible_alpha: torch.Tensor,  # (R,) fp32 in (0, 1]
) -> torch.Tensor:  # (R, V) fp32
    """Same contract as `combine_lanes_torch`; per-lane statistics, then grid (R, V blocks)."""
    args = (lane_logits, lane_temperature, lane_index, weight, log_softmax, plausible_lane,
            plausible_alpha)  # fmt: skip
    _check_args(*args)
    (num_lanes, vocab), (num_rows, slots) = lane_logits.shape, lane_index.shape
    device = lane_logits.device
    if num_lanes == 0 or vocab == 0 or num_rows == 0:
        # Nothing to launch: no lane can be present and no mask applies (zeros), or no output.
        return torch.zeros(num_rows, vocab, dtype=torch.float32, device=device)

    from steerserve.kernels.combine.kernel import combine_kernel, lane_stats_kernel

    block = min(BLOCK_V, 1 << (max(vocab, 16) - 1).bit_length())  # a power of 2
    lane_max = torch.empty(num_lanes, dtype=torch.float32, device=device)
    lane_lse = torch.empty(num_lanes, dtype=torch.float32, device=device)
    lane_stats_kernel[(num_lanes,)](
        lane_logits, lane_temperature, lane_max, lane_lse, vocab, BLOCK=block, num_warps=4
    )
    out = torch.empty(num_rows, vocab, dtype=torch.float32, device=device)
    # log(alpha) by torch, as in the reference and dense paths: the same threshold bits.
    log_alpha = plausible_alpha.log()
    grid = (num_rows, -(-vocab // block))  # (rows, cdiv(V, block))
    combine_kernel[grid](
        lane_logits, lane_temperature, lane_max, lane_lse, lane_index, weight, log_softmax,
        plausible_lane, log_alpha, out, num_lanes, vocab,
        SLOTS=slots, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out


def combine_aligned(
    blocks: list[torch.Tensor],  # per slot (R, V) fp32: row r of every slot belongs to row r
    temperatures: list[float],  # per slot, > 0
    weights: list[float],  # per slot
    log_softmax: bool,
    plausible: torch.Tensor | None,  # (R, V) fp32 rows of the plausible set, or None
    plausible_temperature: float,
    plausible_alpha: float,
) -> torch.Tensor:  # (R, V) fp32
    """`combine_lanes_torch`'s contract for rows that all combine the same way, each slot a
    block of aligned rows (a request's prompt positions, when it scores its prompt): no
    stacked table and no gathers, which cost as much as a prompt's forward at 49k vocab."""
    out = torch.zeros_like(blocks[0]) if blocks else None
    impossible = torch.zeros(out.shape, dtype=torch.bool, device=out.device) \
        if out is not None else None
    for block, temperature, w in zip(blocks, temperatures, weights, strict=True):
        if w == 0:
            continue  # absent slot
        values = block / temperature
        if log_softmax:
            values = _log_softmax_keep_neg_inf(values)
        neg = values == NEG_INF
        impossible |= neg
        out += torch.where(neg, 0.0, w * values)
    if plausible is not None:
        log_alpha = torch.tensor(plausible_alpha, dtype=torch.float32).log()
        impossible |= _implausible(plausible / plausible_temperature, log_alpha.to(out.device))
    return torch.where(impossible, NEG_INF, out)


def combine_lanes(
    lane_logits: torch.Tensor,
    lane_temperature: torch.Tensor,
    lane_index: torch.Tensor,
    weight: torch.Tensor,
    log_softmax: torch.Tensor,
    plausible_lane: torch.Tensor,
    plausible_alpha: torch.Tensor,
) -> torch.Tensor:
    """One (R, V) row per request from the lanes' logits; Triton, else dense PyTorch, by device."""
    require(isinstance(lane_logits, torch.Tensor), "lane_logits must be a torch.Tensor")
    use_triton = dispatch.BACKENDS.use_triton("combine_lanes", lane_logits.device)
    impl = combine_lanes_triton if use_triton else combine_lanes_dense
    return impl(lane_logits, lane_temperature, lane_index, weight, log_softmax, plausible_lane,
                plausible_alpha)  # fmt: skip
