"""Routed adapter ensembles (ELREA, Li et al., "Ensembles of Low-Rank Expert Adapters"): the
prompt is routed to the expert LoRA adapters whose training clusters its gradient resembles,
and the chosen experts' logits are summed with the routing weights.

Routing happens once per request, when the method is built, computed on the server's routing
worker and never in the batched step (adapters/routing/): the prompt's feature is compared
with each cluster's centroid by cosine similarity, and the `top_k` most similar are kept,
weighted by a softmax of their similarities over the router's temperature. `"routing":
"hidden"` uses the mean final hidden state instead of the gradient: cheaper (a forward, no
backward), and a deviation from the paper. The response's `decoding` object reports the
experts and weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from steerserve.decoding.methods.base import (
    DecodingMethod,
    LanePlanner,
    Mix,
    ParamError,
    lane,
    param,
)
from steerserve.decoding.request import LaneSpec


@dataclass(frozen=True)
class RoutedExpertsParams:
    router: str = param(doc="the router, as loaded with --router", min_length=1,
                        max_length=128)
    top_k: int | None = param(None, doc="experts combined (default 2, at most the router's)",
                              ge=1, le=8)
    routing: Literal["gradient", "hidden"] | None = param(
        None, doc="'gradient' (default, the paper's: the prompt's loss gradient through the "
        "router's feature adapter) or 'hidden' (the prompt's mean final hidden state: "
        "cheaper, a deviation)")


@dataclass(frozen=True, eq=False)
class RoutedExperts(DecodingMethod):
    name: ClassVar[str] = "routed_experts"
    Params: ClassVar[type] = RoutedExpertsParams
    lanes: tuple[LaneSpec, ...]  # the chosen experts, most similar first
    weights: tuple[float, ...] = ()
    experts: tuple[str, ...] = ()
    routing: str = "gradient"

    @classmethod
    def build(cls, params: RoutedExpertsParams, planner: LanePlanner) -> RoutedExperts:
        router = planner.router(params.router, "router")
        base = planner.base
        if base.model != router.model or base.adapter is not None:
            raise ParamError("router", f"router '{params.router}' routes requests on "
                             f"'{router.model}' itself; its experts replace an adapter, so "
                             "the request's model must be that model")
        available = len(router.experts)
        top_k = min(2, available) if params.top_k is None else params.top_k
        if top_k > available:
            raise ParamError("top_k", f"router '{params.router}' has {available} expert(s); "
                             f"top_k {top_k} is more")
        routing = params.routing or "gradient"
        if routing == "gradient" and len(base.prompt_ids) < 2:
            raise ParamError("routing", "a gradient needs a prompt of two tokens or more; "
                             "use \"routing\": \"hidden\"")
        chosen = router.route(list(base.prompt_ids), routing == "hidden", top_k)
        lanes = tuple(planner.lane(expert, "router") for expert, _ in chosen)
        return cls(lanes, tuple(w for _, w in chosen), tuple(e for e, _ in chosen), routing)

    def mix(self) -> Mix:
        return Mix(tuple(lane(i, w) for i, w in enumerate(self.weights)), log_softmax=False)

    def described(self) -> dict:
        return {"routed_to": [{"expert": e, "weight": round(w, 6)}
                              for e, w in zip(self.experts, self.weights, strict=True)]}
