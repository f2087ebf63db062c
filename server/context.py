"""Everything a route needs, built once at start-up and stored on the app."""

from __future__ import annotations

from dataclasses import dataclass, field

from steerserve.adapters.lora.slots import AdapterWeights
from steerserve.adapters.registry import AdapterRegistry
from steerserve.adapters.steering.spec import ModelShape
from steerserve.adapters.steering.store import VectorStore
from steerserve.decoding.engine.client import AsyncEngine
from steerserve.decoding.model.loader import LoadedModel
from steerserve.decoding.sampling.temperature_head import TemperatureHead
from steerserve.server.errors import APIError
from steerserve.server.metrics import Metrics
from steerserve.server.settings import ServerSettings
from steerserve.server.translate.sampling import Limits


@dataclass(frozen=True)
class ServingContext:
    settings: ServerSettings
    model: LoadedModel  # the first hosted model: LoRA adapters run over it
    engine: AsyncEngine
    metrics: Metrics
    limits: Limits
    created: int
    adapters: AdapterRegistry
    vectors: VectorStore
    shape: ModelShape
    temperature_heads: dict[str, TemperatureHead]
    models: dict[str, LoadedModel] = field(default_factory=dict)  # every hosted model
    vocab_checks: dict[tuple[str, str], bool] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.model.name


@dataclass(frozen=True)
class Served:
    """What a request's `model` names: a hosted model, or an adapter over the first one."""

    name: str  # the hosted model's name
    model: LoadedModel
    adapter: AdapterWeights | None
    limits: Limits
    shape: ModelShape


def resolve_reference(ctx: ServingContext, name: str,
                      param: str = "model") -> tuple[str, AdapterWeights | None]:
    """A model reference: a hosted model (no adapter) or a LoRA adapter (vLLM's rule)."""
    if name in ctx.models:
        return name, None
    adapter = ctx.adapters.get(name)
    if adapter is None:
        served = [*ctx.models] + [n for n, _ in ctx.adapters.items()]
        raise APIError(404, f"The model '{name}' does not exist on this server "
                       f"(served: {', '.join(served)})", param, "model_not_found")
    return ctx.model_name, adapter


def resolve_model(ctx: ServingContext, name: str) -> Served:
    hosted, adapter = resolve_reference(ctx, name)
    if hosted == ctx.model_name:
        return Served(hosted, ctx.model, adapter, ctx.limits, ctx.shape)
    model = ctx.models[hosted]
    runner = ctx.engine.engine.models[hosted].runner
    limits = Limits(model.max_model_len, runner.vocab_size, ctx.limits.max_n,
                    ctx.limits.max_stop)
    return Served(hosted, model, None, limits, ModelShape.of(model.model.config))
