"""A step's plan: everything the scheduler decided before anything runs.

The engine executes it in order (refusals answered, a long prompt's chunk prefilled, the
rows computed, the outcome committed); nothing calls back into the scheduler meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from steerserve.decoding.engine.inbox import Submit
from steerserve.decoding.engine.state import Sequence


@dataclass(frozen=True)
class StepPlan:
    rows: list[Sequence]  # every running request, one sampled row each, in batch order
    joining: list[Sequence]  # admitted in this step: their lanes prefill now
    chunk: Sequence | None = None  # a long prompt getting its next chunk (not yet a row)
    placed: int = 0  # waiting requests that got their slots in this step
    refused: list[tuple[Submit, Exception]] = field(default_factory=list)  # placing raised

    @property
    def left_the_queue(self) -> int:
        return self.placed + len(self.refused)
