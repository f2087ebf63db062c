"""A request's activation steering, resolved against the model into per-layer edits.

Layer numbering: layer N is the output of decoder block N (0-based), i.e. HF
`hidden_states[N + 1]`. This is repeng's numbering (its ControlModel wraps `layers[N]`) and
the `direction.N` convention of control-vector GGUF files (llama.cpp applies `direction.N`
after block N as well).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from enum import IntEnum, StrEnum

import torch

from steerserve.kernels.steering.ops import MODE_ABLATE, MODE_ADD, MODE_CLAMP


class SteerMode(IntEnum):
    """How an item edits the residual stream; the values are the kernel's mode codes."""

    ADD = MODE_ADD  # h + scale * v
    ABLATE = MODE_ABLATE  # remove the component along v
    CLAMP = MODE_CLAMP  # set the component along v to `scale`


class SteerTarget(StrEnum):
    RESIDUAL = "residual"  # the block output (residual stream)
    HEADS = "heads"  # attention heads' outputs, i.e. the input of the output projection


class ApplyTo(StrEnum):
    PROMPT = "prompt"  # every prompt position
    GENERATION = "generation"  # positions whose output is sampled: last prompt one + generated
    BOTH = "both"


class _Placed:
    """Where an edit acts: prompt positions, generated ones, or both (`apply_to`)."""

    apply_to: ApplyTo

    @property
    def on_prompt(self) -> bool:
        return self.apply_to != ApplyTo.GENERATION

    @property
    def on_generation(self) -> bool:
        return self.apply_to != ApplyTo.PROMPT


@dataclass(frozen=True, eq=False)
class SteerEdit(_Placed):
    """One item on one layer. `vector` is (hidden,) for the residual target and
    (num_heads, head_dim) for heads, zero on heads left alone; fp32 on the model's device."""

    layer: int
    target: SteerTarget
    vector: torch.Tensor
    scale: float
    mode: SteerMode
    normalize: bool
    apply_to: ApplyTo


@dataclass(frozen=True, eq=False)
class FeatureEdit(_Placed):
    """One sparse-autoencoder feature edited at one layer (kernels/sae): the residual is
    encoded on the feature, and `value * decoder` (add) or `(value - activation) * decoder`
    (clamp) is added back. Tensors are (hidden,) fp32 rows of the SAE, on the model's device."""

    layer: int
    key: tuple[str, int]  # (SAE name, feature): rows shared by requests are sent once a step
    encoder: torch.Tensor
    bias: float  # b_enc with b_dec folded in
    threshold: float  # JumpReLU's; 0 for ReLU
    decoder: torch.Tensor
    clamp: bool  # False: add value * decoder; True: set the activation to value
    value: float
    apply_to: ApplyTo


@dataclass(frozen=True, eq=False)
class SteeringSpec:
    """All of a request's edits, in request order (order matters for ablate/clamp). On a
    layer, vector edits apply first, then SAE feature edits (each encoded from that result)."""

    edits: tuple[SteerEdit, ...]
    features: tuple[FeatureEdit, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.edits or self.features)

    @functools.cached_property
    def prompt_digest(self) -> bytes | None:
        """A digest of everything done to prompt positions (None: nothing): two specs with
        the same digest give a prompt the same keys, so they may share cached prefixes."""
        edits = [e for e in self.edits if e.on_prompt]
        features = [f for f in self.features if f.on_prompt]
        if not edits and not features:
            return None
        digest = hashlib.blake2b(digest_size=16)
        for e in edits:
            digest.update(repr((e.layer, e.target, e.scale, e.mode, e.normalize)).encode())
            digest.update(_tensor_bytes(e.vector))
        for f in features:
            digest.update(repr((f.layer, f.key, f.bias, f.threshold, f.clamp, f.value)).encode())
            digest.update(_tensor_bytes(f.encoder) + _tensor_bytes(f.decoder))
        return digest.digest()

    @property
    def edits_last_prompt_position(self) -> bool:
        """Whether an edit acts at the prompt's last position only (one applied to generated
        tokens: that position yields the first), so it differs from the other positions."""
        return any(not e.on_prompt for e in (*self.edits, *self.features))


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


@dataclass(frozen=True)
class ModelShape:
    """What steering needs to know about the model to validate and place edits."""

    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> ModelShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, config.hidden_size, heads, head_dim)

    @property
    def heads_width(self) -> int:
        return self.num_heads * self.head_dim
