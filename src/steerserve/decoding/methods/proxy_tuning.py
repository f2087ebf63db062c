"""Proxy-tuning (Liu et al. 2024): z_base + alpha * (z_expert - z_anti), over raw logits."""

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
from steerserve.decoding.request import LaneSpec

MODEL_REF = {"min_length": 1, "max_length": 128}


@dataclass(frozen=True)
class ProxyTuningParams:
    expert: str = param(doc="the expert: a hosted model or a LoRA adapter", **MODEL_REF)
    anti_expert: str = param(doc="the anti-expert (the expert's untuned base): a hosted "
                             "model or a LoRA adapter", **MODEL_REF)
    alpha: float | None = param(None, doc="weight of the expert's offset (default 1)", ge=0.0,
                                le=100.0)
    expert_chat_template: bool | None = param(
        None, doc="/v1/completions only: the expert lane sees the prompt through its chat "
        "template (the reference's instruction-tuned expert)")


@dataclass(frozen=True, eq=False)
class ProxyTuning(DecodingMethod):
    name: ClassVar[str] = "proxy_tuning"
    Params: ClassVar[type] = ProxyTuningParams
    lanes: tuple[LaneSpec, ...]  # base, expert, anti-expert
    alpha: float = 1.0

    @classmethod
    def build(cls, params: ProxyTuningParams, planner: LanePlanner) -> ProxyTuning:
        templated = params.expert_chat_template
        if planner.chat and templated is not None:
            raise ParamError("expert_chat_template", "in a chat request every lane already "
                             "sees its model's chat template; expert_chat_template is for "
                             "/v1/completions")
        if planner.scoring and templated:
            raise ParamError("expert_chat_template", "prompt scoring needs every lane on the "
                             "same prompt tokens: expert_chat_template is not available with "
                             "echo + logprobs")
        expert = planner.lane(params.expert, "expert", chat_template=bool(templated))
        anti = planner.lane(params.anti_expert, "anti_expert")
        alpha = 1.0 if params.alpha is None else params.alpha
        return cls((planner.base, expert, anti), alpha)

    def mix(self) -> Mix:
        return Mix((lane(0), lane(1, self.alpha), lane(2, -self.alpha)), log_softmax=False)
