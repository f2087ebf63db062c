"""The one place steerserve reaches into Hugging Face's modules.

Any decoder without an own forward (decoding/model/families.py) runs here, the slower path,
with the hook points of decoding/model/fused.py mapped onto transformers' modules; and the
mechanics that takes live here and nowhere else:

* the step's SteeringPlan and Capture travel as the `steering` and `capture` keywords of the
  decoder forward, which transformers hands to every decoder layer and on to its attention
  function;
* a forward hook on each block calls the block-output hook point, a pre-hook on the first
  block the embedding one, and an attention function registered with transformers wraps the
  model's own one and calls the heads-output one (decoding/model/hook_points.py);
* every projection inside the blocks is swapped for a `LoraLinear` that adds its rows' adapter
  deltas;
* our own forward fuses projections into one weight, and the modules' weights become views into
  it (`fuse_in_place`), so nothing is stored twice and these modules stay usable.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from steerserve.adapters.lora.bank import LoraBank
from steerserve.adapters.steering.plan import SteeringPlan
from steerserve.decoding.model import hook_points
from steerserve.decoding.model.capture import Capture
from steerserve.decoding.model.families import sliding_mask, sliding_window

PLAN_KEYWORD, CAPTURE_KEYWORD = "steering", "capture"


class ModuleDecoder:
    """Called like FusedDecoder: (B, T) ids -> (B, T, C) normed, through the model's modules."""

    def __init__(self, model: nn.Module, lora_bank: LoraBank | None) -> None:
        self.model = model
        self.decoder = getattr(model, model.base_model_prefix)
        self.dtype = next(model.parameters()).dtype
        _install_steering_hooks(model)
        if lora_bank is not None:
            _wrap_projections(model, lora_bank)
        # transformers renamed the decoders' `past_key_values` to `cache` (5.2x): either works
        parameters = inspect.signature(self.decoder.forward).parameters
        self._cache_keyword = "cache" if "cache" in parameters else "past_key_values"

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                 window, steering: SteeringPlan | None,
                 capture: Capture | None = None) -> torch.Tensor:
        extra = {PLAN_KEYWORD: steering} if steering else {}  # unsteered batches: no plan
        if capture is not None:
            extra[CAPTURE_KEYWORD] = capture
        extra[self._cache_keyword] = window
        out = self.decoder(input_ids=input_ids, position_ids=position_ids,
                           attention_mask=self._masks(mask, position_ids),
                           use_cache=window is not None, **extra)
        return out.last_hidden_state  # (B, T, C)

    def _masks(self, mask: torch.Tensor, position_ids: torch.Tensor):
        """The mask as the modules take it: narrowed to the window where layers slide (one per
        layer type where the config lists them, else one for every layer, Mistral's way: a 4D
        mask is used as given, window or not), additive for eager attention (which adds it
        to the logits)."""
        config = self.model.config
        types = getattr(config, "layer_types", None)
        masks = {}
        for layer in range(config.num_hidden_layers):
            window = sliding_window(config, layer)
            kind = types[layer] if types is not None else ""
            masks[kind] = mask if window is None else sliding_mask(mask, position_ids, window)
        if "eager" in config._attn_implementation:  # ours wraps it: steerserve_eager_...
            lowest = torch.finfo(self.dtype).min
            masks = {kind: torch.zeros(m.shape, dtype=self.dtype, device=m.device)
                     .masked_fill(~m, lowest) for kind, m in masks.items()}
        return masks if types is not None else masks[""]


# ---- steering: block hooks and the attention wrapper -------------------------------------
def _install_steering_hooks(model: nn.Module) -> None:
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


def _steer_block(module: nn.Module, args, kwargs, output):
    steering, capture = kwargs.get(PLAN_KEYWORD), kwargs.get(CAPTURE_KEYWORD)
    if steering or capture is not None:
        hidden = output[0] if isinstance(output, tuple) else output  # (B, T, C)
        hook_points.block_output(steering, capture, module.steer_layer_index, hidden)
    return None  # edited in place


def _capture_embeddings(module: nn.Module, args, kwargs):
    capture = kwargs.get(CAPTURE_KEYWORD)
    if capture is not None:
        hook_points.embeddings(capture, args[0] if args else kwargs["hidden_states"])


def _steered_attention(inner):
    """Wrap an attention function: the heads' outputs (B, T, NH, D) reach their hook point."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        steering = kwargs.pop(PLAN_KEYWORD, None)
        capture = kwargs.pop(CAPTURE_KEYWORD, None)
        out, weights = inner(module, query, key, value, attention_mask, **kwargs)
        if steering or capture is not None:
            flat = out.view(out.shape[0], out.shape[1], -1)
            hook_points.heads_output(steering, capture, module.layer_idx, flat)
        return out, weights

    return attention


# ---- LoRA: projections swapped for wrappers ----------------------------------------------
class LoraLinear(nn.Module):
    """An nn.Linear plus the bank's LoRA slots for it."""

    def __init__(self, base: nn.Linear, bank: LoraBank, key: str) -> None:
        super().__init__()
        self.base = base
        self.bank = bank
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.bank.active
        if batch is not None and self.key in self.bank.lora_a:
            self.bank.apply(self.key, x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1]), batch)
        return y


def _wrap_projections(model: nn.Module, bank: LoraBank) -> None:
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("this model already has a LoRA bank installed")
    for key, linear in bank.linears.items():
        parent_name, _, child = key.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoraLinear(linear, bank, key))


def base_linear(module: nn.Module) -> nn.Linear:
    """The projection itself, under a LoRA wrapper or not."""
    return module.base if isinstance(module, LoraLinear) else module


# ---- our own forward's weights, shared with the modules -----------------------------------
def fuse_in_place(modules: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several projections of the same input; the projections'
    own parameters become row views into it."""
    linears = [base_linear(m) for m in modules]
    weight = torch.cat([linear.weight.data for linear in linears])
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([linear.bias.data for linear in linears])
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = weight[start:start + rows]
        if bias is not None:
            linear.bias.data = bias[start:start + rows]
        start += rows
    return weight, bias
