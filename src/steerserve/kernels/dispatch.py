"""Choose between a Triton kernel and its PyTorch path: once per (op, device type), logged once
with its reason, for the whole process (vLLM decides its samplers the same way)."""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Callable
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


def choose_backend(device: torch.device | str) -> KernelChoice:
    """Triton on CUDA devices (or anywhere under TRITON_INTERPRET=1), else PyTorch."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return KernelChoice(False, "triton is not installed")
    if triton_interpreting():
        return KernelChoice(True, "TRITON_INTERPRET=1: Triton kernels run in the interpreter")
    if device.type == "cuda":
        return KernelChoice(True, f"Triton kernels on {torch.cuda.get_device_name(device)}")
    return KernelChoice(False, f"no Triton backend for device '{device.type}': PyTorch path")


class Dispatch:
    """The cached choices. `choose` is replaceable so tests can force either path."""

    def __init__(self, choose: Callable[[torch.device], KernelChoice] = choose_backend) -> None:
        self._choose = choose
        self._choices: dict[tuple[str, str], KernelChoice] = {}
        self._lock = threading.Lock()

    def choice(self, op: str, device: torch.device | str) -> KernelChoice:
        device = torch.device(device)
        key = (op, device.type)
        with self._lock:
            found = self._choices.get(key)
            if found is None:
                found = self._choices[key] = self._choose(device)
                logger.info("kernel %s on %s: %s (%s)", op, device.type,
                            "triton" if found.use_triton else "torch", found.reason)
        return found

    def use_triton(self, op: str, device: torch.device | str) -> bool:
        return self.choice(op, device).use_triton


BACKENDS = Dispatch()  # the process's choices; ops read it as `dispatch.BACKENDS` at call time
