"""What every kernel test module shares: the device, the Triton marker, and the checks that
an entry point dispatches once per device and that a launcher module imports Triton lazily."""

from __future__ import annotations

import ast
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

from steerserve.kernels import dispatch
from steerserve.kernels.dispatch import Dispatch, KernelChoice

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CAN_RUN_TRITON = importlib.util.find_spec("triton") is not None and (
    DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
)
requires_triton = pytest.mark.skipif(
    not CAN_RUN_TRITON, reason="needs triton, and CUDA or TRITON_INTERPRET=1"
)


def module_level_imports(module: ModuleType) -> set[str]:
    """What a module imports at its top level, read from its source (static, so it costs no
    interpreter start-up): relative imports keep their leading dots."""
    imported: set[str] = set()
    for node in ast.parse(Path(module.__file__ or "").read_text()).body:
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    return imported


def assert_triton_imported_lazily(module: ModuleType, kernel_modules: tuple[str, ...]) -> None:
    """Triton, and the modules holding @triton.jit kernels, may only be imported inside the
    launchers (TRITON_INTERPRET is read when a kernel is decorated)."""
    imported = module_level_imports(module)
    assert not any("triton" in name or name.endswith(kernel_modules) for name in imported), \
        imported


def record_dispatch(monkeypatch: pytest.MonkeyPatch, use_triton: bool) -> list[torch.device]:
    """Make every entry point choose `use_triton`; returns the devices it was asked about."""
    decisions: list[torch.device] = []

    def choose(device: torch.device) -> KernelChoice:
        decisions.append(device)
        return KernelChoice(use_triton, "test")

    monkeypatch.setattr(dispatch, "BACKENDS", Dispatch(choose))
    return decisions
