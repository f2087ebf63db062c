"""The decoding-method protocol: what a method tells the engine, and what it may ask.

A method is one class in one module of this package, registered in `registry.py`. Per
request, `build(params, planner)` checks the method's parameters and returns a frozen
instance that owns the request's lanes. The engine then asks the instance, and only it:

* `lanes`, `late_lanes`      which lanes to run, and how many join after the prefill;
* `prompt_logits_lanes`      which lanes keep their prompt logits (scoring, SH2's keys);
* `capture_layers`           which block outputs a lane keeps (DoLa's early exits);
* `after_prefill`            the lanes that join after the prefill (SH2's hesitation lane);
* `mix`                      how lane logits and derived rows combine into one row;
* `step_rows`, `prompt_rows` derived rows made from what the lanes captured (DoLa's
                             premature layer, Co-LLM's chosen model), for the next token
                             and for prompt scoring;
* `described`                what the response reports besides the request's fields;
* `token_value`              a number per generated token the response reports under the
                             class's `reports` name (Co-LLM's choices), when asked.

Its HTTP fields are the fields of its `Params` dataclass, declared with `param()`; the
server builds the `decoding` schema from them, so neither the server nor the engine names a
method. The recipe for a new method is in docs/methods.md.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol

import torch

if TYPE_CHECKING:
    from steerserve.adapters.routing.features import PromptRouter
    from steerserve.decoding.methods.deferral_head import DeferralHead
    from steerserve.decoding.model.info import ModelInfo
    from steerserve.decoding.request import LaneSpec


def param(default: Any = dataclasses.MISSING, *, doc: str, **bounds: Any) -> Any:
    """A method parameter: `doc` for the API schema, `bounds` are pydantic-style
    constraints (ge, gt, le, lt, min_length, max_length). No default: required."""
    return dataclasses.field(default=default, metadata={"doc": doc, **bounds})


class ParamError(ValueError):
    """A parameter refused by `build`: `field` is the parameter's name (a dotted path for
    nested ones), `status` the HTTP status (400, or 404 for an unknown model)."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


class Term(NamedTuple):
    source: str  # "lane" (a position in the method's lanes) or "derived" (a derived row)
    index: int
    weight: float


def lane(index: int, weight: float = 1.0) -> Term:
    return Term("lane", index, weight)


def derived(index: int, weight: float = 1.0) -> Term:
    return Term("derived", index, weight)


@dataclass(frozen=True)
class Mix:
    """One row = sum of weight * term, over raw logits or log-softmaxes (each lane's logits
    divided by its temperature first), optionally masked to the tokens whose probability under
    lane `plausible` is at least `alpha` times the largest (relative top)."""

    terms: tuple[Term, ...]
    log_softmax: bool
    plausible: int | None = None
    alpha: float = 0.1

    @property
    def is_identity(self) -> bool:
        return self.terms == (lane(0),) and not self.log_softmax and self.plausible is None


IDENTITY = Mix((lane(0),), log_softmax=False)


class LanePlanner(Protocol):
    """What `build` may ask about the request (the server implements it)."""

    base: LaneSpec  # the request's own lane: its model or adapter, prompt and steering
    scoring: bool  # echo + logprobs: every lane must be aligned on the request's prompt
    chat: bool  # prompts come from each model's chat template
    seed: int | None

    def lane(self, reference: str, field: str, *, chat_template: bool = False,
             temperature: float = 1.0) -> LaneSpec:
        """A lane on a hosted model or adapter (the request's prompt, tokenized or templated
        for that model; the request's steering when it is the request's model). Raises
        ParamError naming `field` for an unknown model or another vocabulary."""

    def model(self, name: str) -> ModelInfo: ...

    def deferral_head(self, name: str, field: str) -> DeferralHead:
        """A head loaded with --deferral-head; ParamError naming `field` when none is."""

    def router(self, name: str, field: str) -> PromptRouter:
        """A router loaded with --router; ParamError naming `field` when none is."""


class LaneView(Protocol):
    """What a method reads of its lanes in the current step (positions as in `lanes`, late
    lanes after them)."""

    def logits(self, position: int) -> torch.Tensor: ...  # (V,) next-token logits

    def hidden(self, position: int) -> torch.Tensor: ...  # (C,) the final normed state

    def prompt_logits(self, position: int) -> torch.Tensor | None: ...  # (P - 1, V)

    def early(self, position: int) -> dict[int, torch.Tensor]: ...  # layer -> (C,) / (P, C)

    def prompt_ids(self, position: int) -> tuple[int, ...]: ...

    def temperature(self, position: int) -> float: ...  # its logits are divided by this

    def key(self, position: int) -> int: ...  # equal for positions served by one lane


class EarlyExits(Protocol):
    def __call__(self, model: str, hidden: torch.Tensor) -> torch.Tensor:
        """(N, C) block outputs of `model` -> (N, V) logits (final norm + LM head)."""


class DecodingMethod(ABC):
    """Subclasses are frozen dataclasses with a `lanes` field and their resolved parameters."""

    name: ClassVar[str]
    Params: ClassVar[type]  # a frozen dataclass of `param()` fields: the request's options
    reports: ClassVar[str | None] = None  # the response field `token_value`s are listed in
    lanes: tuple[LaneSpec, ...]

    @classmethod
    @abstractmethod
    def build(cls, params: Any, planner: LanePlanner) -> DecodingMethod:
        """Check `params` (an instance of `Params`) and resolve the lanes."""

    @abstractmethod
    def mix(self) -> Mix: ...

    @property
    def late_lanes(self) -> int:
        """Lanes that `after_prefill` adds, on the model of lanes[0] (slots are reserved)."""
        return 0

    def prompt_logits_lanes(self, scoring: bool) -> frozenset[int]:
        """Lane positions (late ones included) whose prompt logits this method needs."""
        return frozenset(range(len(self.lanes) + self.late_lanes)) if scoring else frozenset()

    def capture_layers(self, position: int) -> tuple[int, ...]:
        """Block outputs the lane at `position` keeps for `step_rows` / `prompt_rows`."""
        return ()

    def after_prefill(self, view: LaneView) -> tuple[LaneSpec, ...]:
        """The late lanes, once lanes[0] is prefilled (prefilled in the same step); they may
        only use the model of lanes[0] and adapters the request's lanes already use."""
        return ()

    def described(self) -> dict:
        """What the response's `decoding` object adds to the request's fields (ELREA's
        routing)."""
        return {}

    @property
    def reporting(self) -> bool:
        """Whether this request's `token_value`s are reported (the client asked)."""
        return False

    def token_value(self, view: LaneView) -> float | None:
        """This step's number for the response's `reports` list (None: nothing reported)."""
        return None

    @classmethod
    def step_rows(cls, members: list[tuple[DecodingMethod, LaneView]],
                  early_exits: EarlyExits) -> list[torch.Tensor | None]:
        """Per member, its derived rows (D, V) for the next token; one call per step for all
        requests of this method, so shared work (an LM head) runs once."""
        return [None] * len(members)

    def prompt_rows(self, view: LaneView, count: int,
                    early_exits: EarlyExits) -> torch.Tensor | None:
        """Derived rows (count, D, V) for the last `count` prompt positions (scoring)."""
        return None
