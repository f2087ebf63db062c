"""Contrastive decoding, both variants, with the expert-plausible set (relative top alpha):

* li2022 (Li et al. 2022): log p_expert - beta * log p_amateur(z / T_amateur);
* obrien2023 (O'Brien & Lewis 2023): (1 + beta) z_expert - beta z_amateur, raw logits.
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
from steerserve.decoding.methods.proxy_tuning import MODEL_REF
from steerserve.decoding.request import LaneSpec


@dataclass(frozen=True)
class ContrastiveParams:
    amateur: str = param(doc="the amateur: a hosted model or a LoRA adapter", **MODEL_REF)
    variant: Literal["li2022", "obrien2023"] | None = param(
        None, doc="li2022 (log-probabilities, default) or obrien2023 (raw logits)")
    alpha: float | None = param(None, doc="plausibility threshold: keep tokens with p >= alpha "
                                "* max p under the expert (default 0.1; 0: no mask)", ge=0.0,
                                le=1.0)
    beta: float | None = param(None, doc="weight of the amateur (default 0.5)", ge=0.0,
                               le=100.0)
    amateur_temperature: float | None = param(None, doc="li2022: the amateur's temperature "
                                              "(default 1)", gt=0.0, le=10.0)
    amateur_prefix: Literal["full", "last_token"] | None = param(
        None, doc="the amateur sees the full prompt (default) or only its last token")


@dataclass(frozen=True, eq=False)
class Contrastive(DecodingMethod):
    name: ClassVar[str] = "contrastive"
    Params: ClassVar[type] = ContrastiveParams
    lanes: tuple[LaneSpec, ...]  # expert (the request's own lane), amateur
    variant: str = "li2022"
    alpha: float = 0.1
    beta: float = 0.5

    @classmethod
    def build(cls, params: ContrastiveParams, planner: LanePlanner) -> Contrastive:
        last_token = params.amateur_prefix == "last_token"
        if planner.scoring and last_token:
            raise ParamError("amateur_prefix", "prompt scoring needs the amateur on the full "
                             "prompt")
        temperature = 1.0 if params.amateur_temperature is None else params.amateur_temperature
        amateur = planner.lane(params.amateur, "amateur", temperature=temperature)
        if last_token:
            amateur = LaneSpec(amateur.model, amateur.prompt_ids[-1:], amateur.adapter,
                               amateur.steering, temperature)
        return cls((planner.base, amateur), params.variant or "li2022",
                   0.1 if params.alpha is None else params.alpha,
                   0.5 if params.beta is None else params.beta)

    def mix(self) -> Mix:
        if self.variant == "li2022":
            return Mix((lane(0), lane(1, -self.beta)), True, plausible=self._plausible,
                       alpha=self.alpha)
        return Mix((lane(0, 1.0 + self.beta), lane(1, -self.beta)), False,
                   plausible=self._plausible, alpha=self.alpha)

    @property
    def _plausible(self) -> int | None:
        return 0 if self.alpha > 0 else None  # alpha 0: no mask
