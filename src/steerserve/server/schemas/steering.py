"""Request bodies for activation steering: the per-request `steering` items and the vector
extraction endpoint."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from steerserve.kernels.steering.ops import MAX_ITEMS
from steerserve.server.schemas.base import ResourceName, Strict

Finite = Annotated[float, Field(allow_inf_nan=False)]
MAX_STEERING_ITEMS = MAX_ITEMS  # a row's items on one layer are one kernel launch (K <= 8)
MAX_INLINE_LAYERS = 1024
MAX_INLINE_WIDTH = 65536
MAX_PAIRS = 1024
# Far beyond any useful setting, and inside every dtype's range once multiplied (a JSON number
# such as 1e300 is finite for Python and infinite in float32).
MAX_SCALE = 1e4
MAX_INLINE_VALUE = 1e4


class LayerRange(Strict):
    """Inclusive on both ends, like llama.cpp's --control-vector-layer-range."""

    start: int = Field(ge=0)
    end: int = Field(ge=0)


Bounded = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_INLINE_VALUE, le=MAX_INLINE_VALUE)]
Vector = Annotated[list[Bounded], Field(min_length=1, max_length=MAX_INLINE_WIDTH)]


class SteeringItem(Strict):
    vector: str | None = Field(None, min_length=1, max_length=128)
    values: Vector | Annotated[list[Vector], Field(min_length=1,
                                                   max_length=MAX_INLINE_LAYERS)] | None = None
    layers: Annotated[list[int], Field(max_length=MAX_INLINE_LAYERS)] | LayerRange | None = None
    heads: list[tuple[int, int]] | None = Field(None, min_length=1, max_length=4096)
    scale: Finite = Field(1.0, ge=-MAX_SCALE, le=MAX_SCALE)
    mode: Literal["add", "ablate", "clamp"] = "add"
    normalize: bool = False
    apply_to: Literal["prompt", "generation", "both"] = "both"
    target: Literal["residual", "heads"] = "residual"
    # A sparse-autoencoder feature instead of a vector (--sae): add `scale` times its decoder
    # direction, or clamp its activation to `clamp`.
    sae: str | None = Field(None, min_length=1, max_length=128)
    feature: int | None = Field(None, ge=0, le=2**31 - 1)
    clamp: Bounded | None = None


Steering = Annotated[list[SteeringItem], Field(min_length=1, max_length=MAX_STEERING_ITEMS)]


class ExtractVectorRequest(Strict):
    name: ResourceName
    model: str
    positive: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1,
                                                                max_length=MAX_PAIRS)
    negative: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1,
                                                                max_length=MAX_PAIRS)
    method: Literal["mean_diff", "pca_diff", "pca_center"] = "pca_diff"
    layers: Annotated[list[int], Field(max_length=MAX_INLINE_LAYERS)] | LayerRange | None = None
    target: Literal["residual", "heads"] = "residual"
    batch_size: int = Field(8, ge=1, le=64)
