"""Hook points for activation steering, installed once when the engine takes the model.

Nothing is stored on the model between forwards: the step's SteeringPlan travels as the
`steering` keyword of the decoder forward, which transformers hands to every decoder layer
and on to its attention function. Two hook points read it:

* a forward hook on each decoder block edits the block's output (the residual stream), and
  a pre-hook on the first block captures the embedding output (DoLa's layer 0);
* an attention function registered with transformers wraps the model's own one (sdpa) and
  edits the heads' outputs before the output projection (ITI / LoFiT offsets).
"""

from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from steerserve.adapters.steering.plan import EMBEDDINGS, SteeringPlan
from steerserve.adapters.steering.spec import SteerTarget
from steerserve.kernels.sae.ops import sae_edit
from steerserve.kernels.steering.ops import steer_heads, steer_residual

PLAN_KEYWORD = "steering"


def _steer_block(module: torch.nn.Module, args, kwargs, output):
    plan: SteeringPlan | None = kwargs.get(PLAN_KEYWORD)
    if plan:
        hidden = output[0] if isinstance(output, tuple) else output  # (B, T, C)
        steer_block_output(plan, module.steer_layer_index, hidden)
    return None  # edited in place


def _capture_embeddings(module: torch.nn.Module, args, kwargs):
    plan: SteeringPlan | None = kwargs.get(PLAN_KEYWORD)
    if plan and plan.capture is not None and plan.capture.target == SteerTarget.RESIDUAL:
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, T, C)
        plan.capture.read(EMBEDDINGS, hidden)


def steer_block_output(plan: SteeringPlan, layer: int, hidden: torch.Tensor) -> None:
    """The residual stream after block `layer`, (B, T, C), edited in place (and captured)."""
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
    capture = plan.capture
    if capture is not None and capture.target == SteerTarget.RESIDUAL:
        capture.read(layer, hidden)


def keep_finite(hidden: torch.Tensor) -> None:
    """A steered activation past the dtype's range (easy in fp16) becomes its largest finite
    value, never inf or NaN: what flows on, and into the KV cache, stays a number."""
    torch.nan_to_num_(hidden, nan=0.0)


def _steered_attention(inner):
    """Wrap an attention function: heads' outputs (B, T, NH, D) get the plan's offsets."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        plan: SteeringPlan | None = kwargs.pop(PLAN_KEYWORD, None)
        out, weights = inner(module, query, key, value, attention_mask, **kwargs)
        if plan:
            steer_heads_output(plan, module.layer_idx, out.view(out.shape[0], out.shape[1], -1))
        return out, weights

    return attention


def steer_heads_output(plan: SteeringPlan, layer: int, flat: torch.Tensor) -> None:
    """The heads' outputs of layer `layer`, (B, T, NH * D), the input of its output
    projection, edited in place (and captured)."""
    calls = plan.heads.get(layer, ())
    for call in calls:
        steer_heads(flat, call.head_offsets, call.offset_index, call.scale, call.position_mask)
    if calls:
        keep_finite(flat)
    capture = plan.capture
    if capture is not None and capture.target == SteerTarget.HEADS:
        capture.read(layer, flat)


def install_steering_hooks(model: torch.nn.Module) -> None:
    """Once per model: block hooks plus a steering-aware copy of its attention function."""
    if getattr(model, "_steerserve_hooks", False):
        return
    decoder = getattr(model, model.base_model_prefix)
    for index, layer in enumerate(decoder.layers):
        layer.steer_layer_index = index
        layer.register_forward_hook(_steer_block, with_kwargs=True)
    decoder.layers[0].register_forward_pre_hook(_capture_embeddings, with_kwargs=True)
    current = model.config._attn_implementation
    inner, name = ALL_ATTENTION_FUNCTIONS.get(current), f"steerserve_{current}"
    if current == "eager":  # each architecture's own function (Gemma 2's soft-caps)
        inner = getattr(inspect.getmodule(type(model)), "eager_attention_forward", None)
        name = f"steerserve_eager_{model.config.model_type}"
    if inner is None:
        raise ValueError(f"steering needs a registered attention implementation, not '{current}'")
    AttentionInterface.register(name, _steered_attention(inner))
    model.set_attn_implementation(name)
    model._steerserve_hooks = True
