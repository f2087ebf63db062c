"""What a method reads of its request's lanes in one step (the LaneView protocol)."""

from __future__ import annotations

import torch

from steerserve.decoding.engine.state import Sequence
from steerserve.decoding.model.forward import LaneResult, Results


class StepView:
    def __init__(self, sequence: Sequence, results: Results) -> None:
        self.sequence = sequence
        self.results = results

    def _result(self, position: int) -> LaneResult:
        return self.results[self.sequence.lanes[position]]

    def logits(self, position: int) -> torch.Tensor:
        return self._result(position).logits

    def hidden(self, position: int) -> torch.Tensor:
        return self._result(position).hidden

    def prompt_logits(self, position: int) -> torch.Tensor | None:
        return self._result(position).prompt_logits

    def early(self, position: int) -> dict[int, torch.Tensor]:
        return self._result(position).early

    def prompt_ids(self, position: int) -> tuple[int, ...]:
        return self.sequence.lanes[position].prompt_ids

    def temperature(self, position: int) -> float:
        return self.sequence.lane_temperatures[position]

    def key(self, position: int) -> int:
        return id(self.sequence.lanes[position])
