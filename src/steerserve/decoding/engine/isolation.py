"""Failures stay with the request that caused them.

A step is computed for the whole batch. If that raises, every request's step is computed
again on its own (its lanes in forwards of their own, its seeded generator rewound to where
the step began), so the request that raises is found and failed alone, and every other one
gets exactly the token it would have got: sampling depends only on its own generator, and
the forwards on its own lanes (up to floating-point differences between batch shapes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from steerserve.decoding.engine.compute import StepOutcome
from steerserve.decoding.engine.state import Sequence

logger = logging.getLogger(__name__)

Compute = Callable[[list[Sequence], list[Sequence]], StepOutcome]


@dataclass
class Computed:
    outcomes: list[StepOutcome]  # one for the batch, or one per request that did not fail
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)


class GeneratorSnapshot:
    """Seeded requests' generator states at the start of a step."""

    def __init__(self, requests: list[Sequence]) -> None:
        self._states = {s: s.generator.get_state() for s in requests if s.generator is not None}

    def restore(self, s: Sequence) -> None:
        state = self._states.get(s)
        if state is not None:
            s.generator.set_state(state)


def compute_isolated(compute: Compute, requests: list[Sequence],
                     joining: list[Sequence]) -> Computed:
    snapshot = GeneratorSnapshot(requests)
    try:
        return Computed([compute(requests, joining)])
    except Exception:
        logger.exception("a batched step failed; computing each of its %d requests alone",
                         len(requests))
    computed = Computed([])
    for s in requests:
        snapshot.restore(s)
        try:
            computed.outcomes.append(compute([s], [j for j in joining if j is s]))
        except Exception as exc:
            logger.exception("request %s failed in the engine step", s.request_id)
            computed.failed.append((s, exc))
    return computed
