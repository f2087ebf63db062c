"""`lora`: a per-request scale for one adapter or weights for several resident adapters,
served as one virtual adapter (adapters/lora/mix.py) over the request's base model."""

from __future__ import annotations

from steerserve.adapters.lora.mix import MixTooLarge
from steerserve.server.context import Served, ServingContext
from steerserve.server.errors import APIError
from steerserve.server.schemas.requests import LoraTerm


def resolve_lora(ctx: ServingContext, served: Served, terms: list[LoraTerm] | None) -> Served:
    if not terms:
        return served
    if served.adapter is not None:
        raise APIError(400, "'model' names an adapter: give the base model there and the "
                       "adapters in 'lora'", "lora")
    if served.info.name != ctx.engine.primary.name or not ctx.settings.lora_enabled:
        raise APIError(400, f"model '{served.info.name}' runs no LoRA adapters", "lora")
    if len(terms) > ctx.settings.max_loras:
        raise APIError(400, f"{len(terms)} adapters in one request; the server holds at most "
                       f"{ctx.settings.max_loras} at once (--max-loras)", "lora")
    names = [term.name for term in terms]
    if len(set(names)) != len(names):
        raise APIError(400, "each adapter may appear once in 'lora'", "lora")
    parts = []
    for i, term in enumerate(terms):
        adapter = ctx.engine.adapters.get(term.name)
        if adapter is None:
            raise APIError(404, f"no LoRA adapter '{term.name}' is loaded", f"lora.{i}.name",
                           "model_not_found")
        parts.append((adapter, term.scale))
    try:
        mixed = ctx.lora_mixes.get(parts, ctx.settings.max_lora_rank)
    except MixTooLarge as exc:
        raise APIError(400, str(exc), "lora") from exc
    return Served(served.info, mixed)
