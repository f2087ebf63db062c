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

from steerserve.decoding.engine.compute import StepOutcome
from steerserve.decoding.engine.state import Sequence

logger = logging.getLogger(__name__)

Compute = Callable[[list[Sequence], list[Sequence]], StepOutcome]
Fail = Callable[[Sequence, Exception], None]


class GeneratorSnapshot:
    """Seeded requests' generator states at the start of a step."""

    def __init__(self, requests: list[Sequence]) -> None:
        self._states = {s: s.generator.get_state() for s in requests if s.generator is not None}

    def restore(self, s: Sequence) -> None:
        state = self._states.get(s)
        if state is not None:
            s.generator.set_state(state)


def compute_isolated(compute: Compute, requests: list[Sequence], admitted: list[Sequence],
                     fail: Fail) -> list[StepOutcome]:
    """The step's outcomes: one for the batch, or one per request that did not fail."""
    snapshot = GeneratorSnapshot(requests)
    try:
        return [compute(requests, admitted)]
    except Exception:
        logger.exception("a batched step failed; computing each of its %d requests alone",
                         len(requests))
    outcomes = []
    for s in requests:
        snapshot.restore(s)
        try:
            outcomes.append(compute([s], [a for a in admitted if a is s]))
        except Exception as exc:
            logger.exception("request %s failed in the engine step", s.request_id)
            fail(s, exc)
    return outcomes

