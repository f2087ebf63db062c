"""Weighted logit arithmetic: sum_i w_i * log p_i(z_i / T_i) over any list of terms.

EFT's emulated fine-tuning and "model arithmetic" (Dekoninck et al. 2024) in one rule: e.g.
base + beta * (expert - anti-expert) with any beta to scale a tuned behaviour up or down,
or a weighted mixture of several adapters' log-distributions. Every term is a hosted model
or a LoRA adapter; the request's own model must be one of them (nothing it names is
dropped), and its vocabulary is the row's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from steerserve.decoding.methods.base import (
    DecodingMethod,
    LanePlanner,
    Mix,
    ParamError,
    lane,
    param,
)
from steerserve.decoding.methods.proxy_tuning import MODEL_REF
from steerserve.decoding.request import LaneSpec

MAX_TERMS = 8


@dataclass(frozen=True)
class ArithmeticTerm:
    model: str = param(doc="a hosted model or a LoRA adapter", **MODEL_REF)
    weight: float = param(doc="its weight w_i (may be negative)", ge=-100.0, le=100.0)
    temperature: float | None = param(None, doc="T_i: its logits are divided by it before the "
                                      "log-softmax (default 1)", gt=0.0, le=10.0)


@dataclass(frozen=True)
class LogitArithmeticParams:
    terms: list[ArithmeticTerm] = param(doc="the terms w_i * log p_i, one of them on the "
                                        "request's own model", min_length=1,
                                        max_length=MAX_TERMS)


@dataclass(frozen=True, eq=False)
class LogitArithmetic(DecodingMethod):
    name: ClassVar[str] = "logit_arithmetic"
    Params: ClassVar[type] = LogitArithmeticParams
    lanes: tuple[LaneSpec, ...]  # the request's own term first, then the others in order
    weights: tuple[float, ...] = ()

    @classmethod
    def build(cls, params: LogitArithmeticParams, planner: LanePlanner) -> LogitArithmetic:
        specs = [planner.lane(term.model, f"terms.{i}.model", temperature=term.temperature
                              or 1.0) for i, term in enumerate(params.terms)]
        own = [i for i, spec in enumerate(specs) if _is_base(planner, spec)]
        if not own:
            raise ParamError("terms", "the request's own model must be one of the terms "
                             "(give it weight 0 to leave it out of the sum)")
        order = [own[0]] + [i for i in range(len(specs)) if i != own[0]]
        return cls(tuple(specs[i] for i in order),
                   tuple(params.terms[i].weight for i in order))

    def mix(self) -> Mix:
        return Mix(tuple(lane(i, w) for i, w in enumerate(self.weights)), log_softmax=True)


def _is_base(planner: LanePlanner, spec: LaneSpec) -> bool:
    return spec.model == planner.base.model and spec.adapter is planner.base.adapter
