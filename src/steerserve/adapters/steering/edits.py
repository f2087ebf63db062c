"""What steering does at each hook point, the same in our own forward and in the Hugging Face
modules (both reach it through decoding/model/hook_points.py): residual edits and SAE features
at a block's output; head offsets at the output projection's input."""

from __future__ import annotations

import torch

from steerserve.adapters.steering.plan import SteeringPlan
from steerserve.kernels.sae.ops import sae_edit
from steerserve.kernels.steering.ops import steer_heads, steer_residual


def steer_block_output(plan: SteeringPlan, layer: int, hidden: torch.Tensor) -> None:
    """The residual stream after block `layer`, (B, T, C), edited in place."""
    calls = plan.residual.get(layer, ())
    for call in calls:
        steer_residual(hidden, call.vectors, call.vector_index, call.scale, call.mode,
                       call.normalize, call.position_mask)
    features = plan.features.get(layer, ())
    for feature in features:
        sae_edit(hidden, feature.encoders, feature.enc_bias, feature.threshold,
                 feature.decoders, feature.feature_index, feature.mode, feature.value,
                 feature.position_mask)
    if calls or features:
        keep_finite(hidden)


def steer_heads_output(plan: SteeringPlan, layer: int, flat: torch.Tensor) -> None:
    """The heads' outputs of layer `layer`, (B, T, NH * D), the input of its output
    projection, edited in place."""
    calls = plan.heads.get(layer, ())
    for call in calls:
        steer_heads(flat, call.head_offsets, call.offset_index, call.scale, call.position_mask)
    if calls:
        keep_finite(flat)


def keep_finite(hidden: torch.Tensor) -> None:
    """A steered activation past the dtype's range (easy in fp16) becomes its largest finite
    value, never inf or NaN: what flows on, and into the KV cache, stays a number."""
    torch.nan_to_num_(hidden, nan=0.0)
