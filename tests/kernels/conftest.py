"""Kernel tests: Triton kernels run natively on CUDA, else in Triton's CPU interpreter.

TRITON_INTERPRET is read when a kernel is decorated with @triton.jit, so it must be set
before any kernel module is imported; pytest imports this conftest before the test modules.
An explicit TRITON_INTERPRET in the environment wins (setdefault).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
