"""Everything a route needs, built once at start-up and stored on the app."""

from __future__ import annotations

from dataclasses import dataclass

from decoding.async_engine import AsyncEngine
from decoding.model_loader import LoadedModel
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

    @property
    def model_name(self) -> str:
        return self.model.name


def require_model(ctx: ServingContext, name: str) -> None:
    if name != ctx.model_name:
        raise APIError(404, f"The model '{name}' does not exist on this server "
                       f"(served: {ctx.model_name})", "model", "model_not_found")
