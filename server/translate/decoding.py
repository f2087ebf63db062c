"""The request's `decoding` -> a DecodingMethod with its lanes, every field checked.

A model reference (`expert`, `anti_expert`, `amateur`) is a hosted model's name or a LoRA
adapter's (the adapter over its base model). Models used together must share the
vocabulary; a larger expert vocabulary loses its extra trailing rows, as in the reference.
Steering applies to every lane on the request's own model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from steerserve.adapters.lora.slots import AdapterWeights
from steerserve.adapters.steering.spec import SteeringSpec
from steerserve.decoding.methods.strategies import DecodingMethod, dola_layers
from steerserve.decoding.model.hosted import LaneSpec
from steerserve.server.context import ServingContext, resolve_reference
from steerserve.server.errors import APIError
from steerserve.server.schemas.requests import DecodingRequest, SamplingFields

PARAM = "decoding"
_FIELDS = {
    "proxy_tuning": {"expert", "anti_expert", "alpha", "expert_chat_template"},
    "contrastive": {"amateur", "variant", "alpha", "beta", "amateur_temperature",
                    "amateur_prefix"},
    "sh2": {"alpha", "key_num", "mask"},
    "dola": {"layers", "relative_top"},
}
_REQUIRED = {"proxy_tuning": ("expert", "anti_expert"), "contrastive": ("amateur",)}

PromptFor = Callable[[str, bool], list[int]]  # (hosted model, chat template?) -> token ids


@dataclass(frozen=True)
class Target:
    """A resolved model reference."""

    model: str
    adapter: AdapterWeights | None = None


def describe(decoding: DecodingRequest | None) -> dict | None:
    """What the response reports: the method and the parameters the client set."""
    if decoding is None:
        return None
    return decoding.model_dump(exclude_none=True)


def resolve_method(ctx: ServingContext, req: SamplingFields, base: Target, prompt_for: PromptFor,
                   steering: SteeringSpec | None, scoring: bool,
                   chat: bool = False) -> DecodingMethod | None:
    rule = req.decoding
    if rule is None:
        return None
    _check_fields(rule, scoring)
    if chat and rule.expert_chat_template is not None:
        raise APIError(400, "in a chat request every lane already sees its model's chat "
                       "template; expert_chat_template is for /v1/completions",
                       f"{PARAM}.expert_chat_template")
    builder = _LaneBuilder(ctx, base, prompt_for, steering)
    name = rule.method
    if name == "proxy_tuning":
        expert = builder.lane(rule.expert, "expert", bool(rule.expert_chat_template))
        anti = builder.lane(rule.anti_expert, "anti_expert")
        return DecodingMethod(name, (builder.base_lane(), expert, anti), alpha=_or(rule.alpha,
                                                                                  1.0))
    if name == "contrastive":
        return _contrastive(rule, builder)
    if name == "sh2":
        return DecodingMethod(name, (builder.base_lane(),), alpha=_or(rule.alpha, 10.0),
                              key_num=_or(rule.key_num, 10.0),
                              relative_top=0.1 if rule.mask else None, seed=req.seed)
    layers = _dola_layers(rule, ctx.models[base.model].model.config.num_hidden_layers)
    return DecodingMethod(name, (builder.base_lane(),), layers=layers,
                          relative_top=_or(rule.relative_top, 0.1))


def _or(value, default):
    return default if value is None else value


def _check_fields(rule: DecodingRequest, scoring: bool) -> None:
    given = {name for name in rule.model_fields_set if name != "method"}
    for name in sorted(given - _FIELDS[rule.method]):
        raise APIError(400, f"'{name}' does not apply to method '{rule.method}' (it takes "
                       f"{', '.join(sorted(_FIELDS[rule.method]))})", f"{PARAM}.{name}")
    for name in _REQUIRED.get(rule.method, ()):
        if getattr(rule, name) is None:
            raise APIError(400, f"method '{rule.method}' needs '{name}', a model reference",
                           f"{PARAM}.{name}")
    if scoring and rule.expert_chat_template:
        raise APIError(400, "prompt scoring needs every lane on the same prompt tokens: "
                       "expert_chat_template is not available with echo + logprobs",
                       f"{PARAM}.expert_chat_template")
    if scoring and rule.amateur_prefix == "last_token":
        raise APIError(400, "prompt scoring needs the amateur on the full prompt",
                       f"{PARAM}.amateur_prefix")


def _contrastive(rule: DecodingRequest, builder: _LaneBuilder) -> DecodingMethod:
    alpha = _or(rule.alpha, 0.1)
    if not 0.0 < alpha <= 1.0:
        raise APIError(400, "alpha (the plausibility threshold) must lie in (0, 1]",
                       f"{PARAM}.alpha")
    amateur = builder.lane(rule.amateur, "amateur", temperature=_or(rule.amateur_temperature,
                                                                    1.0),
                           last_token=rule.amateur_prefix == "last_token")
    return DecodingMethod("contrastive", (builder.base_lane(), amateur), alpha=alpha,
                          beta=_or(rule.beta, 0.5), variant=_or(rule.variant, "li2022"))


def _dola_layers(rule: DecodingRequest, num_layers: int) -> tuple[int, ...]:
    layers = _or(rule.layers, "high")
    if isinstance(layers, str):
        chosen = dola_layers(layers, num_layers)
    else:
        chosen = tuple(sorted(set(layers)))
        if not chosen or any(not 0 <= layer < num_layers - 1 for layer in chosen):
            raise APIError(400, f"DoLa's premature layers must lie in 0..{num_layers - 2} (the "
                           "last block's output is the mature distribution)", f"{PARAM}.layers")
    if not chosen:
        raise APIError(400, f"this model has too few layers ({num_layers}) for the bucket "
                       f"'{layers}'", f"{PARAM}.layers")
    return chosen


class _LaneBuilder:
    def __init__(self, ctx: ServingContext, base: Target, prompt_for: PromptFor,
                 steering: SteeringSpec | None) -> None:
        self.ctx, self.base, self.prompt_for, self.steering = ctx, base, prompt_for, steering

    def base_lane(self) -> LaneSpec:
        return self._spec(self.base, False)

    def lane(self, reference: str, field: str, chat_template: bool = False,
             temperature: float = 1.0, last_token: bool = False) -> LaneSpec:
        target = Target(*resolve_reference(self.ctx, reference, f"{PARAM}.{field}"))
        check_vocabulary(self.ctx, self.base.model, target.model, f"{PARAM}.{field}")
        spec = self._spec(target, chat_template, temperature)
        if last_token:
            spec = LaneSpec(spec.model, spec.prompt_ids[-1:], spec.adapter, spec.steering,
                            temperature)
        return spec

    def _spec(self, target: Target, chat_template: bool, temperature: float = 1.0) -> LaneSpec:
        steering = self.steering if target.model == self.base.model else None
        return LaneSpec(target.model, tuple(self.prompt_for(target.model, chat_template)),
                        target.adapter, steering, temperature)


def check_vocabulary(ctx: ServingContext, base: str, other: str, param: str) -> None:
    """Same token ids for every token of the base vocabulary (extra trailing ids allowed)."""
    if base == other:
        return
    key = (base, other)
    if key not in ctx.vocab_checks:
        ours = ctx.models[base].tokenizer.get_vocab()
        theirs = ctx.models[other].tokenizer.get_vocab()
        same = all(theirs.get(token) == index for token, index in ours.items())
        extra_at_end = all(index >= len(ours) for token, index in theirs.items()
                           if token not in ours)
        ctx.vocab_checks[key] = same and extra_at_end
    if not ctx.vocab_checks[key]:
        raise APIError(400, f"models '{base}' and '{other}' do not share a vocabulary, so "
                       "their logits cannot be combined", param)
