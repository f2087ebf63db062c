"""The engine's heap thresholds: a freed step buffer is reused, not faulted in again."""

from __future__ import annotations

import platform
import resource

import pytest
import torch

from steerserve.decoding.engine.heap import keep_freed_memory

BUFFER = 3 << 20  # floats: 12 MB, the logits of 64 rows of a 49k vocabulary
STEP = 8  # buffers alive at once: 96 MB, more than glibc's largest dynamic trim threshold
PAGES = STEP * BUFFER * 4 // 4096


def _faults() -> int:
    """Minor page faults of this thread alone (engines of other tests run beside it)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def _step() -> None:
    buffers = [torch.empty(BUFFER) for _ in range(STEP)]
    for buffer in buffers:
        buffer.fill_(1.0)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_a_steps_buffers_freed_and_allocated_again_are_not_faulted_in_again():
    assert keep_freed_memory()
    _step()  # the heap grows once
    before = _faults()
    for _ in range(10):
        _step()
    # with glibc's defaults the free top of the heap is trimmed after every step (or each
    # block unmapped): about 10 x PAGES faults here
    assert _faults() - before < PAGES
