"""Hidden states a forward keeps: any method may declare the block outputs its lanes keep
(`DecodingMethod.capture_layers`: DoLa's early exits), and vector extraction records block or
heads' outputs over whole prompts. Read at the hook points (decoding/model/hook_points.py),
apart from steering."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from steerserve.adapters.steering.spec import SteerTarget

EMBEDDINGS = -1  # the capture index of the embedding output (the input of block 0)


@dataclass
class Capture:
    """Record block outputs (or heads' outputs): vector extraction, DoLa's early exits."""

    layers: frozenset[int]
    target: SteerTarget
    positions: torch.Tensor | None  # (N,) one position per captured row; None = all
    rows: torch.Tensor | None = None  # (N,) batch rows to capture; None = every row
    found: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (N, W) / (N, S, W)

    def read(self, layer: int, hidden: torch.Tensor) -> None:
        """hidden (B, S, W): keep this layer's requested rows and positions, in fp32."""
        if layer not in self.layers:
            return
        rows = self.rows if self.rows is not None else torch.arange(hidden.shape[0],
                                                                   device=hidden.device)
        picked = hidden[rows] if self.positions is None else hidden[rows, self.positions]
        self.found[layer] = picked.float().clone()
