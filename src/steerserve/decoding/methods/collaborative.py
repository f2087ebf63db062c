"""Co-LLM (Shen et al. 2024, "Learning to Decode Collaboratively with Multiple Language
Models"): per token, a deferral head on the base model's last hidden state decides whether
the base or an assistant generates it, and the chosen model's distribution is sampled.

The decision rule is the paper's: defer when P(defer) = 1 - P(base) exceeds the request's
threshold, to the most probable assistant (with one assistant, the paper's single head). The
head is trained by the marginal likelihood of a latent choice per token
(examples/train_deferral_head.py). Lanes: the base (the request's model, with its adapter and
steering) and each assistant (a hosted model or an adapter), all decoding the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from steerserve.decoding.methods.base import (
    DecodingMethod,
    EarlyExits,
    LanePlanner,
    LaneView,
    Mix,
    ParamError,
    derived,
    param,
)
from steerserve.decoding.methods.deferral_head import MAX_ASSISTANTS, DeferralHead
from steerserve.decoding.request import LaneSpec

NAME = {"min_length": 1, "max_length": 128}


@dataclass(frozen=True)
class CollaborativeParams:
    assistants: list[str] = param(doc="the assistant models, in the order of the deferral "
                                  "head's scores: hosted models or LoRA adapters",
                                  min_length=1, max_length=MAX_ASSISTANTS)
    head: str = param(doc="the deferral head, as loaded with --deferral-head", **NAME)
    threshold: float | None = param(None, doc="defer when P(defer) is above this (default "
                                    "0.5; 0 always defers, 1 never)", ge=0.0, le=1.0)
    report: bool = param(False, doc="report per token which model generated it (0: the "
                         "base, i: assistant i) as the choice's 'deferrals'")


@dataclass(frozen=True, eq=False)
class Collaborative(DecodingMethod):
    name: ClassVar[str] = "collaborative"
    Params: ClassVar[type] = CollaborativeParams
    reports: ClassVar[str | None] = "deferrals"
    lanes: tuple[LaneSpec, ...]  # the base, then the assistants
    head: DeferralHead | None = None
    threshold: float = 0.5
    report: bool = False

    @classmethod
    def build(cls, params: CollaborativeParams, planner: LanePlanner) -> Collaborative:
        if planner.scoring:
            raise ParamError("", "collaborative decoding chooses a model per generated token "
                             "and cannot score a prompt (echo with logprobs)")
        head = planner.deferral_head(params.head, "head")
        width = planner.model(planner.base.model).shape.hidden_size
        if head.config.hidden_size != width:
            raise ParamError("head", f"deferral head '{params.head}' reads hidden states of "
                             f"width {head.config.hidden_size}; this model's are {width}")
        if len(params.assistants) != head.assistants:
            raise ParamError("assistants", f"deferral head '{params.head}' scores "
                             f"{head.assistants} assistant(s), {len(params.assistants)} given")
        assistants = tuple(planner.lane(name, f"assistants.{i}")
                           for i, name in enumerate(params.assistants))
        threshold = 0.5 if params.threshold is None else params.threshold
        return cls((planner.base, *assistants), head, threshold, params.report)

    def mix(self) -> Mix:
        return Mix((derived(0),), log_softmax=False)

    def choose(self, probabilities: torch.Tensor) -> torch.Tensor:
        """(N, 1 + M) -> (N,) lane positions: the likeliest assistant where P(defer) passes
        the threshold (always at 0, even where it rounds to 0), else 0 (the base)."""
        defer = probabilities[:, 1:].sum(dim=-1)  # not 1 - P(base): that rounds to 0
        assistant = probabilities[:, 1:].argmax(dim=-1) + 1
        deferring = (defer > self.threshold) | (self.threshold == 0.0)
        return torch.where(deferring, assistant, torch.zeros_like(assistant))

    def lane_choice(self, view: LaneView) -> int:
        return int(self.choose(self.head.probabilities(view.hidden(0).unsqueeze(0)))[0])

    @property
    def reporting(self) -> bool:
        return self.report

    def token_value(self, view: LaneView) -> float | None:
        return float(self.lane_choice(view)) if self.report else None

    @classmethod
    def step_rows(cls, members: list[tuple[DecodingMethod, LaneView]],
                  early_exits: EarlyExits) -> list[torch.Tensor | None]:
        """Each row the chosen lane's logits. The head runs per row, exactly as
        `token_value` runs it, so the reported choice is the one sampled (a batched product
        may round differently and flip a choice at the threshold)."""
        return [view.logits(method.lane_choice(view)).unsqueeze(0)  # (1, V)
                for method, view in members]
