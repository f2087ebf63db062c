"""Run-time argument checks shared by the kernels' entry points (ValueError, never assert:
callers may pass anything, and asserts vanish under -O)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_tensor(
    name: str,
    value: torch.Tensor,  # checked at run time too: callers may pass anything
    shape: Sequence[int],
    dtypes: Sequence[torch.dtype],
    device: torch.device,
    contiguous: bool = True,
) -> None:
    """Shape, dtype, device and layout; `contiguous=False` still needs a unit last stride."""
    require(isinstance(value, torch.Tensor), f"{name} must be a torch.Tensor")
    require(
        tuple(value.shape) == tuple(shape),
        f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}",
    )
    require(value.dtype in dtypes, f"{name} has dtype {value.dtype}, expected one of {dtypes}")
    require(value.device == device, f"{name} is on {value.device}, expected {device}")
    if contiguous:
        require(value.is_contiguous(), f"{name} must be contiguous")
    else:
        require(
            value.shape[-1] <= 1 or value.stride(-1) == 1,
            f"{name} must have a contiguous last dimension (stride {value.stride(-1)})",
        )
