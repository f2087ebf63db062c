"""Request bodies of the SAE interpretation routes (server/routes/sae.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_K = 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TopFeaturesRequest(_Strict):
    """For a text: each token's most active features."""

    input: str = Field(min_length=1)
    top_k: int = Field(5, ge=1, le=MAX_TOP_K)


class FeatureActivationsRequest(_Strict):
    """For one feature and a text: its activation on every token (and where it fires)."""

    input: str = Field(min_length=1)
    threshold: float = Field(0.0, ge=0.0, allow_inf_nan=False)  # "fires" = above this
