"""Argument validation for the multi-LoRA ops, the same for both backends."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
# CUDA limits grid dimension 1 (one program column per segment) to 65535.
MAX_SEGMENTS = 65535


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
