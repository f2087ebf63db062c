"""Choose between a Triton kernel and its PyTorch reference, once, and say why."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelChoice:
    use_triton: bool
    reason: str


def triton_interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_backend(device: torch.device | str, prefer_triton: bool = True) -> KernelChoice:
    """Triton on CUDA devices (or anywhere under TRITON_INTERPRET=1), else the reference."""
    device = torch.device(device)
    if not prefer_triton:
        return KernelChoice(False, "Triton disabled by configuration")
    if importlib.util.find_spec("triton") is None:
        return KernelChoice(False, "triton is not installed")
    if triton_interpreting():
        return KernelChoice(True, "TRITON_INTERPRET=1: Triton kernels run in the interpreter")
    if device.type == "cuda":
        return KernelChoice(True, f"Triton kernels on {torch.cuda.get_device_name(device)}")
    return KernelChoice(False, f"no Triton backend for device '{device.type}': PyTorch path")


def log_choice(kernel: str, choice: KernelChoice) -> None:
    logger.info("kernel %s: %s (%s)", kernel, "triton" if choice.use_triton else "torch",
                choice.reason)
