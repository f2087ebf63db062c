"""The request's `decoding` -> its method instance, with every lane resolved and checked.

A model reference is a hosted model's name or a LoRA adapter's (the adapter over its base
model). Models used together must share the vocabulary; a larger expert vocabulary loses
its extra trailing rows, as in the reference. Steering applies to every lane on the
request's own model.
"""

from __future__ import annotations

from collections.abc import Callable

from steerserve.adapters.routing.features import PromptRouter
from steerserve.decoding.methods.base import DecodingMethod, ParamError
from steerserve.decoding.methods.deferral_head import DeferralHead
from steerserve.decoding.methods.plain import Plain
from steerserve.decoding.model.info import ModelInfo
from steerserve.decoding.request import LaneSpec
from steerserve.server.context import ServingContext, resolve_reference
from steerserve.server.errors import APIError
from steerserve.server.schemas.decoding import PARAM

PromptFor = Callable[[str, bool], list[int]]  # (hosted model, chat template?) -> token ids


class RequestPlanner:
    """The LanePlanner a method's `build` asks (decoding/methods/base.py)."""

    def __init__(self, ctx: ServingContext, base: LaneSpec, prompt_for: PromptFor,
                 scoring: bool, chat: bool, seed: int | None) -> None:
        self.ctx, self.base, self.prompt_for = ctx, base, prompt_for
        self.scoring, self.chat, self.seed = scoring, chat, seed

    def lane(self, reference: str, field: str, *, chat_template: bool = False,
             temperature: float = 1.0) -> LaneSpec:
        target = resolve_reference(self.ctx, reference, f"{PARAM}.{field}")
        check_vocabulary(self.ctx, self.base.model, target.name, f"{PARAM}.{field}")
        steering = self.base.steering if target.name == self.base.model else None
        return LaneSpec(target.name, tuple(self.prompt_for(target.name, chat_template)),
                        target.adapter, steering, temperature)

    def model(self, name: str) -> ModelInfo:
        return self.ctx.engine.models[name]

    def deferral_head(self, name: str, field: str) -> DeferralHead:
        return _named(self.ctx.deferral_heads, name, field, "deferral head", "--deferral-head")

    def router(self, name: str, field: str) -> PromptRouter:
        return _named(self.ctx.routers, name, field, "router", "--router")


def _named(table: dict, name: str, field: str, kind: str, option: str):
    """A resource loaded at start; a 404 naming the field and listing what is loaded."""
    if name not in table:
        known = ", ".join(sorted(table)) or f"none ({option})"
        raise ParamError(field, f"no {kind} named '{name}'; loaded: {known}", 404)
    return table[name]


def resolve_method(ctx: ServingContext, raw: dict | None, planner: RequestPlanner
                   ) -> tuple[DecodingMethod, dict | None]:
    """The request's method (Plain without `decoding`) and what the response reports."""
    if raw is None:
        return Plain((planner.base,)), None
    method, params, given = ctx.decoding.parse(raw)
    try:
        built = method.build(params, planner)
    except ParamError as exc:
        param = f"{PARAM}.{exc.field}" if exc.field else PARAM
        raise APIError(exc.status, exc.message, param) from exc
    return built, {**given, **built.described()}


def check_vocabulary(ctx: ServingContext, base: str, other: str, param: str) -> None:
    """Same token ids for every token of the base vocabulary (extra trailing ids allowed)."""
    if base == other:
        return
    key = (base, other)
    if key not in ctx.vocab_checks:
        ours = ctx.engine.models[base].tokenizer.get_vocab()
        theirs = ctx.engine.models[other].tokenizer.get_vocab()
        same = all(theirs.get(token) == index for token, index in ours.items())
        extra_at_end = all(index >= len(ours) for token, index in theirs.items()
                           if token not in ours)
        ctx.vocab_checks[key] = same and extra_at_end
    if not ctx.vocab_checks[key]:
        raise APIError(400, f"models '{base}' and '{other}' do not share a vocabulary, so "
                       "their logits cannot be combined", param)
