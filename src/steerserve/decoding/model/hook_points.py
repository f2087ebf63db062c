"""The hook points every forward calls (ours in fused.py, the modules' in hf_modules.py), in
one place: what steering edits and what a capture keeps at the embedding output, at each
block's output and at each output projection's input."""

from __future__ import annotations

import torch

from steerserve.adapters.steering.edits import steer_block_output, steer_heads_output
from steerserve.adapters.steering.plan import SteeringPlan
from steerserve.adapters.steering.spec import SteerTarget
from steerserve.decoding.model.capture import EMBEDDINGS, Capture


def embeddings(capture: Capture | None, hidden: torch.Tensor) -> None:
    """The embedding output, (B, T, C): the input of block 0 (DoLa's hidden state 0)."""
    if capture is not None and capture.target == SteerTarget.RESIDUAL:
        capture.read(EMBEDDINGS, hidden)


def block_output(steering: SteeringPlan | None, capture: Capture | None, layer: int,
                 hidden: torch.Tensor) -> None:
    """The residual stream after block `layer`, (B, T, C): steered in place, then kept."""
    if steering:
        steer_block_output(steering, layer, hidden)
    if capture is not None and capture.target == SteerTarget.RESIDUAL:
        capture.read(layer, hidden)


def heads_output(steering: SteeringPlan | None, capture: Capture | None, layer: int,
                 flat: torch.Tensor) -> None:
    """The heads' outputs of layer `layer`, (B, T, NH * D): steered in place, then kept."""
    if steering:
        steer_heads_output(steering, layer, flat)
    if capture is not None and capture.target == SteerTarget.HEADS:
        capture.read(layer, flat)
