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

from typing import NamedTuple

import torch

from steerserve.kernels import dispatch
from steerserve.kernels.lora.checks import (
    FLOAT_DTYPES,  # noqa: F401 (re-exported: the constants live with the checks)
    INDEX_DTYPES,  # noqa: F401
    MAX_SEGMENTS,  # noqa: F401
    _check_bgmv_expand,
    _check_bgmv_shrink,
    _check_index,
    _check_pair,
    _check_sgmv_expand,
    _check_sgmv_shrink,
)
from steerserve.kernels.lora.reference import (
    apply_lora_bgmv_torch,
    apply_lora_sgmv_torch,
    lora_expand_bgmv_torch,
    lora_expand_sgmv_torch,
    lora_shrink_bgmv_torch,
    lora_shrink_sgmv_torch,
)


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
