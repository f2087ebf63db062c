"""Engine-side request and lane state, and what the engine reports back per step."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from decoding.detokenizer import IncrementalDetokenizer
from decoding.lora_slots import AdapterWeights
from decoding.sampling_params import SamplingParams
from decoding.steering_spec import SteeringSpec


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


@dataclass
class Sequence:
    """One lane: a sequence decoded on the model with its own KV-cache slot."""

    request: GenerationRequest
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    slot: int = -1
    lora_slot: int = -1
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
    def cached_length(self) -> int:
        """Positions whose keys/values sit in the cache: all but the last sampled token."""
        return self.num_tokens - 1 if self.output_ids else len(self.request.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
