"""Projections whose weights are packed once into oneDNN's blocked layout, for CPU matmuls.

`F.linear` reorders a plain weight for oneDNN on every call; packed once at load, the same
products take about half the time at batch 1-8 and 10-20% less at 64 (bf16 and fp32, the
table in docs/benchmarks.md). This is what inductor's weight freezing does for CPU graphs;
we call the same operator (`torch.ops.mkldnn._linear_pointwise`) without compiling
anything. A packed row's result does not depend on the other rows of the batch (tested), so
batch invariance holds. The packed copy is a second copy of each weight: `--no-packed-weights`
trades the speed back for the memory. Where the operator is missing, the device is not a
CPU or the dtype is one oneDNN cannot pack here (fp16 without AVX512-FP16), F.linear runs.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@functools.cache
def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of `dtype` on `device` here, and gives F.linear's result."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    weight = torch.linspace(-1, 1, 8 * 16).view(8, 16).to(dtype)
    x = torch.linspace(-1, 1, 3 * 16).view(3, 16).to(dtype)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 3)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except RuntimeError as exc:  # e.g. fp16 without the CPU instructions for it
        logger.info("packed weights off for %s: %s", dtype, exc)
        return False
    return torch.allclose(y.float(), F.linear(x, weight).float(), atol=0.05, rtol=0.02)


class Projection:
    """y = x W^T + b over the last dim, W packed once where oneDNN can (else F.linear)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> None:
        self.weight, self.bias = weight, bias
        self.packed = None
        if pack and can_pack(weight.device, weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])
