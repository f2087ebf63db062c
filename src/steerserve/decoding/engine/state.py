"""A running request's engine-side state: what it generated so far and the lanes decoding it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from steerserve.decoding.engine.detokenizer import IncrementalDetokenizer
from steerserve.decoding.model.slot_table import Lane
from steerserve.decoding.request import EngineRequest, FinishReason, OutputSink
from steerserve.decoding.sampling.grammar import GrammarState
from steerserve.decoding.sampling.history import TokenHistory
from steerserve.decoding.sampling.params import SamplingParams


@dataclass(eq=False)
class Sequence:
    request: EngineRequest
    sink: OutputSink
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    eos_ids: frozenset[int] = frozenset()
    history: TokenHistory | None = None  # logit bias and penalty rows
    grammar: GrammarState | None = None  # where a constrained request is in its grammar
    output_ids: list[int] = field(default_factory=list)
    lanes: list[Lane] = field(default_factory=list)  # in the method's order; may repeat one
    lane_temperatures: list[float] = field(default_factory=list)  # per position in `lanes`
    late_pending: int = 0  # late lanes still to join (their slots are reserved)
    finish_reason: FinishReason | None = None
    sequence_temperature: float | None = None  # a learned head's once-per-response choice

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.sampling

    @property
    def prompt_ids(self) -> list[int]:
        return list(self.request.prompt_ids)

    @property
    def unique_lanes(self) -> list[Lane]:
        return list({id(lane): lane for lane in self.lanes}.values())

    @property
    def longest_lane_tokens(self) -> int:
        return max(len(lane.prompt_ids) for lane in self.lanes) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def flag_lanes(sequence: Sequence, positions: range | None = None) -> None:
    """What each lane keeps from its forwards, as the request's method asks."""
    method = sequence.request.method
    scoring = sequence.params.prompt_logprobs is not None
    wanted = method.prompt_logits_lanes(scoring)
    for position in range(len(sequence.lanes)) if positions is None else positions:
        lane = sequence.lanes[position]
        lane.wants_prompt_logits = lane.wants_prompt_logits or position in wanted
        lane.capture_layers = lane.capture_layers or method.capture_layers(position)
