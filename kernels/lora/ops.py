"""Multi-LoRA matmuls for a batch whose rows use different adapters (Punica / S-LoRA style).

The weights of every resident adapter are stacked in slots, per target projection:

- ``lora_a``  (S, R, K): slot s holds adapter A (r, K) zero-padded to R = max rank;
- ``lora_b``  (S, OUT, R): slot s holds adapter B (OUT, r) zero-padded;
- ``scaling`` (S,) float32: lora_alpha / r (or alpha / sqrt(r) for rsLoRA).

For each row i with slot ``idx[i] >= 0``:  y[i] += scaling[idx[i]] * B[idx[i]] @ (A[idx[i]] @ x[i]),
as two steps: shrink ``t = x @ A^T`` (N, R) and expand ``y += scale * t @ B^T`` (in place).
Rows with slot -1 are left untouched (not read, not written).

Two batch layouts:

- BGMV (decode): one slot per row, ``adapter_index`` (N,);
- SGMV (prefill): contiguous segments of rows share a slot: ``segment_starts`` (G+1,) row
  offsets (non-decreasing, within [0, N]; empty segments allowed) and ``segment_adapter``
  (G,) with -1 allowed. Rows outside every segment are left untouched.

Numerics (both backends): accumulate in float32; ``t`` is rounded to the input dtype, as
PEFT's ``lora_B(lora_A(x)) * scaling`` does; ``y + scale * (t @ B^T)`` is formed in float32
and rounded once to y's dtype.

Each op has a PyTorch reference (``*_torch``), a Triton launcher (``*_triton``) with the same
signature, and a public entry point that picks one per device type, once, through
``kernels.dispatch``. Triton is imported only when a Triton launcher first runs.
"""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple

import torch

from steerserve.kernels import dispatch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
# CUDA limits grid dimension 1 (one program column per segment) to 65535.
MAX_SEGMENTS = 65535


class LoraSegments(NamedTuple):
    """SGMV segments: rows starts[g]:starts[g+1] use slot adapter[g] (-1: none)."""

    starts: torch.Tensor  # (G+1,) int64
    adapter: torch.Tensor  # (G,) int64
    max_len: int  # longest segment with an adapter (0 if none): the kernels' grid bound


def build_segments(adapter_index: torch.Tensor) -> LoraSegments:
    """Group a per-row slot index into runs of equal slots (one host sync, for the sizes)."""
    _check_index("adapter_index", adapter_index)
    slots, counts = torch.unique_consecutive(adapter_index, return_counts=True)  # (G,), (G,)
    starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # (G+1,)
    used = counts[slots >= 0]
    max_len = int(used.max()) if used.numel() else 0
    return LoraSegments(starts.to(torch.int64), slots.to(torch.int64), max_len)


# --------------------------------------------------------------------------- validation


def _check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    # The kernels address the last dimension as contiguous (coalesced loads); other
    # dimensions may have any stride (e.g. a column slice of a fused QKV output).
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 in its last dimension, got strides "
                         f"{t.stride()}; pass .contiguous()")


def _check_index(name: str, t: torch.Tensor, length: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if length is not None and t.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {t.shape[0]}")


def _check_devices(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def _check_shrink(x: torch.Tensor, lora_a: torch.Tensor) -> None:
    _check_float("x", x, 2)  # (N, K)
    _check_float("lora_a", lora_a, 3)  # (S, R, K)
    if lora_a.dtype != x.dtype:
        raise ValueError(f"lora_a dtype {lora_a.dtype} must match x dtype {x.dtype}")
    if lora_a.shape[2] != x.shape[1]:
        raise ValueError(f"lora_a {tuple(lora_a.shape)} must be (slots, rank, {x.shape[1]}) "
                         f"for x {tuple(x.shape)}")


def _check_expand(t: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
                  y: torch.Tensor) -> None:
    _check_float("t", t, 2)  # (N, R)
    _check_float("lora_b", lora_b, 3)  # (S, OUT, R)
    _check_float("y", y, 2)  # (N, OUT)
    if not (t.dtype == lora_b.dtype == y.dtype):
        raise ValueError(f"t, lora_b and y must share a dtype, got {t.dtype}, {lora_b.dtype}, "
                         f"{y.dtype}")
    num_slots, n_out, rank = lora_b.shape
    if t.shape[1] != rank:
        raise ValueError(f"t {tuple(t.shape)} must be (rows, {rank}) for lora_b "
                         f"{tuple(lora_b.shape)}")
    if y.shape != (t.shape[0], n_out):
        raise ValueError(f"y {tuple(y.shape)} must be ({t.shape[0]}, {n_out})")
    # y is updated in place by many programs: rows that share memory would race.
    if y.shape[0] > 1 and n_out > 0 and y.stride(0) < n_out:
        raise ValueError(f"y rows overlap in memory (strides {y.stride()}); pass a fresh tensor")
    if not isinstance(scaling, torch.Tensor) or scaling.dtype != torch.float32:
        raise ValueError("scaling must be a float32 tensor")
    if scaling.shape != (num_slots,) or not scaling.is_contiguous():
        raise ValueError(f"scaling must be contiguous with shape ({num_slots},), got "
                         f"{tuple(scaling.shape)}")


def _check_segments(segment_starts: torch.Tensor, segment_adapter: torch.Tensor) -> None:
    _check_index("segment_adapter", segment_adapter)
    num_segments = segment_adapter.shape[0]
    _check_index("segment_starts", segment_starts, num_segments + 1)
    if num_segments > MAX_SEGMENTS:
        raise ValueError(f"at most {MAX_SEGMENTS} segments, got {num_segments}")


def _check_pair(lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    if lora_a.shape[:2] != (lora_b.shape[0], lora_b.shape[2]):
        raise ValueError(f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} "
                         "disagree on slots or rank")


def _check_bgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, idx: torch.Tensor) -> None:
    _check_shrink(x, lora_a)
    _check_index("adapter_index", idx, x.shape[0])
    _check_devices(x=x, lora_a=lora_a, adapter_index=idx)


def _check_bgmv_expand(t: torch.Tensor, lora_b: torch.Tensor, idx: torch.Tensor,
                       scaling: torch.Tensor, y: torch.Tensor) -> None:
    _check_expand(t, lora_b, scaling, y)
    _check_index("adapter_index", idx, t.shape[0])
    _check_devices(t=t, lora_b=lora_b, adapter_index=idx, scaling=scaling, y=y)


def _check_sgmv_shrink(x: torch.Tensor, lora_a: torch.Tensor, starts: torch.Tensor,
                       seg_slot: torch.Tensor) -> None:
    _check_shrink(x, lora_a)
    _check_segments(starts, seg_slot)
    _check_devices(x=x, lora_a=lora_a, segment_starts=starts, segment_adapter=seg_slot)


def _check_sgmv_expand(t: torch.Tensor, lora_b: torch.Tensor, starts: torch.Tensor,
                       seg_slot: torch.Tensor, scaling: torch.Tensor, y: torch.Tensor) -> None:
    _check_expand(t, lora_b, scaling, y)
    _check_segments(starts, seg_slot)
    _check_devices(t=t, lora_b=lora_b, segment_starts=starts, segment_adapter=seg_slot,
                   scaling=scaling, y=y)


# ---------------------------------------------------------------- PyTorch references
# Straightforward loops over the adapters actually used. They sync with the host (to list
# the slots) and validate slot ranges and segment bounds, which the kernels cannot afford.


def _slots_in_use(adapter_index: torch.Tensor, num_slots: int) -> list[int]:
    slots = torch.unique(adapter_index).tolist()
    bad = [s for s in slots if s < -1 or s >= num_slots]
    if bad:
        raise ValueError(f"adapter slots {bad} out of range for {num_slots} slots (or -1)")
    return [s for s in slots if s >= 0]


def _segment_list(starts: torch.Tensor, seg_slot: torch.Tensor, num_rows: int,
                  num_slots: int) -> list[tuple[int, int, int]]:
    """[(start, end, slot)] for non-empty segments that use an adapter."""
    bounds = starts.tolist()
    if bounds[0] < 0 or bounds[-1] > num_rows or any(a > b for a, b in pairwise(bounds)):
        raise ValueError(f"segment_starts must be non-decreasing within [0, {num_rows}], "
                         f"got {bounds}")
    _slots_in_use(seg_slot, num_slots)
    segments = zip(bounds[:-1], bounds[1:], seg_slot.tolist(), strict=True)
    return [(s, e, slot) for s, e, slot in segments if slot >= 0 and e > s]


def _shrink_rows(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """(M, K) @ (R, K)^T -> (M, R), fp32 accumulation, rounded to x's dtype."""
    return (x.float() @ a.float().T).to(x.dtype)


def _expand_rows(t: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
    """New y rows: y (M, OUT) + scale * t (M, R) @ b (OUT, R)^T, in fp32, rounded once."""
    return (y.float() + (t.float() @ b.float().T) * scale).to(y.dtype)


def lora_shrink_bgmv_torch(x: torch.Tensor, lora_a: torch.Tensor,
                           adapter_index: torch.Tensor) -> torch.Tensor:
    _check_bgmv_shrink(x, lora_a, adapter_index)
    t = x.new_zeros((x.shape[0], lora_a.shape[1]))  # (N, R)
    for slot in _slots_in_use(adapter_index, lora_a.shape[0]):
        rows = adapter_index == slot  # (N,) bool
        t[rows] = _shrink_rows(x[rows], lora_a[slot])
    return t


def lora_expand_bgmv_torch(t: torch.Tensor, lora_b: torch.Tensor, adapter_index: torch.Tensor,
                           scaling: torch.Tensor, y: torch.Tensor) -> None:
    _check_bgmv_expand(t, lora_b, adapter_index, scaling, y)
    for slot in _slots_in_use(adapter_index, lora_b.shape[0]):
        rows = adapter_index == slot  # (N,) bool
        y[rows] = _expand_rows(t[rows], lora_b[slot], scaling[slot], y[rows])


def lora_shrink_sgmv_torch(x: torch.Tensor, lora_a: torch.Tensor, segment_starts: torch.Tensor,
                           segment_adapter: torch.Tensor,
                           max_segment_len: int | None = None) -> torch.Tensor:
    """max_segment_len is a grid hint for the kernel; the reference ignores it."""
    _check_sgmv_shrink(x, lora_a, segment_starts, segment_adapter)
    t = x.new_zeros((x.shape[0], lora_a.shape[1]))  # (N, R)
    segments = _segment_list(segment_starts, segment_adapter, x.shape[0], lora_a.shape[0])
    for start, end, slot in segments:
        t[start:end] = _shrink_rows(x[start:end], lora_a[slot])
    return t


def lora_expand_sgmv_torch(t: torch.Tensor, lora_b: torch.Tensor, segment_starts: torch.Tensor,
                           segment_adapter: torch.Tensor, scaling: torch.Tensor, y: torch.Tensor,
                           max_segment_len: int | None = None) -> None:
    _check_sgmv_expand(t, lora_b, segment_starts, segment_adapter, scaling, y)
    segments = _segment_list(segment_starts, segment_adapter, t.shape[0], lora_b.shape[0])
    for start, end, slot in segments:
        y[start:end] = _expand_rows(t[start:end], lora_b[slot], scaling[slot], y[start:end])


def apply_lora_bgmv_torch(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          adapter_index: torch.Tensor, scaling: torch.Tensor,
                          y: torch.Tensor) -> None:
    _check_pair(lora_a, lora_b)
    t = lora_shrink_bgmv_torch(x, lora_a, adapter_index)  # (N, R)
    lora_expand_bgmv_torch(t, lora_b, adapter_index, scaling, y)


def apply_lora_sgmv_torch(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                          segment_starts: torch.Tensor, segment_adapter: torch.Tensor,
                          scaling: torch.Tensor, y: torch.Tensor,
                          max_segment_len: int | None = None) -> None:
    _check_pair(lora_a, lora_b)
    t = lora_shrink_sgmv_torch(x, lora_a, segment_starts, segment_adapter)  # (N, R)
    lora_expand_sgmv_torch(t, lora_b, segment_starts, segment_adapter, scaling, y)


# ------------------------------------------------------------------- Triton launchers
# Same signatures. No host syncs, so they can be captured in CUDA graphs. Slot indices are
# not range-checked on the host (that would sync): out-of-range slots leave rows untouched.
# max_segment_len: an upper bound on the length of every segment with an adapter (e.g.
# LoraSegments.max_len); None bounds it by num_rows, which is correct but launches more
# idle programs.


def lora_shrink_bgmv_triton(x: torch.Tensor, lora_a: torch.Tensor,
                            adapter_index: torch.Tensor) -> torch.Tensor:
    _check_bgmv_shrink(x, lora_a, adapter_index)
    from steerserve.kernels.lora.shrink import (
        shrink_bgmv,  # lazy: importing kernels.lora needs no triton
    )

    return shrink_bgmv(x, lora_a, adapter_index)


def lora_expand_bgmv_triton(t: torch.Tensor, lora_b: torch.Tensor, adapter_index: torch.Tensor,
                            scaling: torch.Tensor, y: torch.Tensor) -> None:
    _check_bgmv_expand(t, lora_b, adapter_index, scaling, y)
    from steerserve.kernels.lora.expand import expand_bgmv

    expand_bgmv(t, lora_b, adapter_index, scaling, y)


def lora_shrink_sgmv_triton(x: torch.Tensor, lora_a: torch.Tensor, segment_starts: torch.Tensor,
                            segment_adapter: torch.Tensor,
                            max_segment_len: int | None = None) -> torch.Tensor:
    _check_sgmv_shrink(x, lora_a, segment_starts, segment_adapter)
    from steerserve.kernels.lora.shrink import shrink_sgmv

    return shrink_sgmv(x, lora_a, segment_starts, segment_adapter, max_segment_len)


def lora_expand_sgmv_triton(t: torch.Tensor, lora_b: torch.Tensor, segment_starts: torch.Tensor,
                            segment_adapter: torch.Tensor, scaling: torch.Tensor,
                            y: torch.Tensor, max_segment_len: int | None = None) -> None:
    _check_sgmv_expand(t, lora_b, segment_starts, segment_adapter, scaling, y)
    from steerserve.kernels.lora.expand import expand_sgmv

    expand_sgmv(t, lora_b, segment_starts, segment_adapter, scaling, y, max_segment_len)


def apply_lora_bgmv_triton(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                           adapter_index: torch.Tensor, scaling: torch.Tensor,
                           y: torch.Tensor) -> None:
    _check_pair(lora_a, lora_b)
    t = lora_shrink_bgmv_triton(x, lora_a, adapter_index)  # (N, R)
    lora_expand_bgmv_triton(t, lora_b, adapter_index, scaling, y)


def apply_lora_sgmv_triton(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                           segment_starts: torch.Tensor, segment_adapter: torch.Tensor,
                           scaling: torch.Tensor, y: torch.Tensor,
                           max_segment_len: int | None = None) -> None:
    _check_pair(lora_a, lora_b)
    t = lora_shrink_sgmv_triton(x, lora_a, segment_starts, segment_adapter,
                                max_segment_len)  # (N, R)
    lora_expand_sgmv_triton(t, lora_b, segment_starts, segment_adapter, scaling, y,
                            max_segment_len)


# ------------------------------------------------------------------- public entry points


def use_triton(device: torch.device | str) -> bool:
    """The process's one choice for the LoRA kernels on this device type."""
    return dispatch.BACKENDS.use_triton("lora", device)


def lora_shrink_bgmv(x: torch.Tensor, lora_a: torch.Tensor,
                     adapter_index: torch.Tensor) -> torch.Tensor:
    """t (N, R) = x (N, K) @ A[idx]^T per row; rows with idx -1 get zeros."""
    impl = lora_shrink_bgmv_triton if use_triton(x.device) else lora_shrink_bgmv_torch
    return impl(x, lora_a, adapter_index)


def lora_expand_bgmv(t: torch.Tensor, lora_b: torch.Tensor, adapter_index: torch.Tensor,
                     scaling: torch.Tensor, y: torch.Tensor) -> None:
    """y (N, OUT) += scaling[idx] * t (N, R) @ B[idx]^T per row, in place."""
    impl = lora_expand_bgmv_triton if use_triton(y.device) else lora_expand_bgmv_torch
    impl(t, lora_b, adapter_index, scaling, y)


def apply_lora_bgmv(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    adapter_index: torch.Tensor, scaling: torch.Tensor, y: torch.Tensor) -> None:
    """y += scaling[idx] * B[idx] @ A[idx] @ x per row (decode), in place."""
    impl = apply_lora_bgmv_triton if use_triton(x.device) else apply_lora_bgmv_torch
    impl(x, lora_a, lora_b, adapter_index, scaling, y)


def lora_shrink_sgmv(x: torch.Tensor, lora_a: torch.Tensor, segment_starts: torch.Tensor,
                     segment_adapter: torch.Tensor,
                     max_segment_len: int | None = None) -> torch.Tensor:
    """t (N, R) = x @ A[slot]^T per segment; rows outside adapter segments get zeros."""
    impl = lora_shrink_sgmv_triton if use_triton(x.device) else lora_shrink_sgmv_torch
    return impl(x, lora_a, segment_starts, segment_adapter, max_segment_len)


def lora_expand_sgmv(t: torch.Tensor, lora_b: torch.Tensor, segment_starts: torch.Tensor,
                     segment_adapter: torch.Tensor, scaling: torch.Tensor, y: torch.Tensor,
                     max_segment_len: int | None = None) -> None:
    """y += scaling[slot] * t @ B[slot]^T per segment, in place."""
    impl = lora_expand_sgmv_triton if use_triton(y.device) else lora_expand_sgmv_torch
    impl(t, lora_b, segment_starts, segment_adapter, scaling, y, max_segment_len)


def apply_lora_sgmv(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    segment_starts: torch.Tensor, segment_adapter: torch.Tensor,
                    scaling: torch.Tensor, y: torch.Tensor,
                    max_segment_len: int | None = None) -> None:
    """y += scaling[slot] * B[slot] @ A[slot] @ x per segment (prefill), in place."""
    impl = apply_lora_sgmv_triton if use_triton(x.device) else apply_lora_sgmv_torch
    impl(x, lora_a, lora_b, segment_starts, segment_adapter, scaling, y, max_segment_len)
