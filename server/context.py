"""Everything a route needs, built once at start-up and stored on the app."""

from __future__ import annotations

from dataclasses import dataclass

from adapters.registry import AdapterRegistry
from adapters.vector_store import VectorStore
from decoding.async_engine import AsyncEngine
from decoding.lora_slots import AdapterWeights
from decoding.model_loader import LoadedModel
from decoding.steering_spec import ModelShape
from decoding.temperature_head import TemperatureHead
from server.convert import Limits
from server.errors import APIError
from server.metrics import Metrics
from server.settings import ServerSettings


@dataclass(frozen=True)
class ServingContext:
    settings: ServerSettings
    model: LoadedModel
    engine: AsyncEngine
    metrics: Metrics
    limits: Limits
    created: int
    adapters: AdapterRegistry
    vectors: VectorStore
    shape: ModelShape
    temperature_heads: dict[str, TemperatureHead]

    @property
    def model_name(self) -> str:
        return self.model.name


def resolve_model(ctx: ServingContext, name: str) -> AdapterWeights | None:
    """The request's `model`: the base model (None) or a LoRA adapter over it (vLLM's rule)."""
    if name == ctx.model_name:
        return None
    adapter = ctx.adapters.get(name)
    if adapter is None:
        served = [ctx.model_name] + [n for n, _ in ctx.adapters.items()]
        raise APIError(404, f"The model '{name}' does not exist on this server "
                       f"(served: {', '.join(served)})", "model", "model_not_found")
    return adapter
