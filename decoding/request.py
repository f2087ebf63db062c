"""Engine-side request and lane state, and what the engine reports back per step."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

import torch

from steerserve.adapters.lora.slots import AdapterWeights
from steerserve.adapters.steering.spec import SteeringSpec
from steerserve.decoding.engine.detokenizer import IncrementalDetokenizer
from steerserve.decoding.sampling.params import SamplingParams

if TYPE_CHECKING:
    from steerserve.decoding.methods.strategies import DecodingMethod
    from steerserve.decoding.model.hosted import Lane


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
    error: str | None = None
    temperatures: tuple[float, ...] = ()  # per new token, when the request asked


OutputSink = Callable[[RequestOutput], None]


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    sink: OutputSink
    adapter: AdapterWeights | None = None  # LoRA adapter run over the base model
    steering: SteeringSpec | None = None  # activation steering edits, per layer
    arrival: float = field(default_factory=time.monotonic)
    model: str | None = None  # hosted model; None = the engine's first model
    method: DecodingMethod | None = None  # multi-lane decoding (its lanes include the model's)


@dataclass(eq=False)
class Sequence:
    """A running request: what it generated so far and the lanes that decode it."""

    request: GenerationRequest
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    lanes: list[Lane] = field(default_factory=list)  # in the method's order; may repeat one
    lane_temperatures: list[float] = field(default_factory=list)  # per position in `lanes`
    eos_ids: frozenset[int] = frozenset()
    finish_reason: FinishReason | None = None
    first_token_time: float | None = None
    sequence_temperature: float | None = None  # a learned head's once-per-response choice

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_ids(self) -> list[int]:
        return list(self.request.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def unique_lanes(self) -> list[Lane]:
        return list({id(lane): lane for lane in self.lanes}.values())

    @property
    def longest_lane_tokens(self) -> int:
        return max(len(lane.prompt_ids) for lane in self.lanes) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
