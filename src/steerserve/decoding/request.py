"""The engine's one request shape, and what it reports back.

The server translates an HTTP body into one frozen `EngineRequest` per choice: its prompt,
its sampling parameters and its decoding method, which owns the request's lanes (each lane
names its hosted model, prompt, adapter and steering). Nothing else travels to the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from steerserve.adapters.lora.slots import AdapterWeights
from steerserve.adapters.steering.spec import SteeringSpec
from steerserve.decoding.sampling.params import SamplingParams

if TYPE_CHECKING:
    from steerserve.decoding.methods.base import DecodingMethod


@dataclass(frozen=True, eq=False)
class LaneSpec:
    """What a lane runs: a hosted model, its own prompt, adapter and steering."""

    model: str
    prompt_ids: tuple[int, ...]
    adapter: AdapterWeights | None = None
    steering: SteeringSpec | None = None
    temperature: float = 1.0  # its logits are divided by this before combining

    def same_as(self, other: LaneSpec) -> bool:
        """Identical lanes give identical logits: one forward serves both (a temperature
        only scales them in the combination)."""
        return (self.model == other.model and self.prompt_ids == other.prompt_ids
                and self.adapter is other.adapter and self.steering is other.steering)


@dataclass(frozen=True, eq=False)
class EngineRequest:
    """One choice of one HTTP request, everything checked by the server."""

    request_id: str
    prompt_ids: tuple[int, ...]  # the request's own prompt (echoed, counted in usage)
    sampling: SamplingParams
    method: DecodingMethod  # owns the lanes; `Plain` for a single-lane request

    @property
    def lanes(self) -> tuple[LaneSpec, ...]:
        return self.method.lanes

    @property
    def model(self) -> str:
        """The hosted model whose vocabulary and tokenizer the sampled row uses."""
        return self.method.lanes[0].model


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float | None  # None for the first prompt token (nothing predicts it)
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Failure:
    """Why a request ended in error: `status` is what an HTTP client should see (500: this
    request failed in the engine; 503: the engine itself stopped)."""

    message: str
    status: int = 500


@dataclass(frozen=True)
class RequestOutput:
    """One step's news for one request: new tokens, released text, and whether it ended."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    failure: Failure | None = None
    temperatures: tuple[float, ...] = ()  # per new token, when the request asked
    method_values: tuple[float, ...] = ()  # per new token, what the method reports
    reports: str | None = None  # the response field method_values are listed in

    @property
    def error(self) -> str | None:
        return self.failure.message if self.failure else None


OutputSink = Callable[[RequestOutput], None]
