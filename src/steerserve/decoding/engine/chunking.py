"""Chunked prefill: a prompt longer than the prefill budget is prefilled a chunk per step,
beside the decode of the running requests, instead of in one forward that stalls them.

Its lanes hold their slots meanwhile; each chunk writes keys and values after those already
in the slot (the prefix cache's offset prefill), and the last part (at most one budget)
runs as an ordinary prefill when the request joins the running ones, so sampling, late
lanes and early-exit captures see nothing different. A lane that scores its prompt keeps
each chunk's logits (every position's), and its last prefill puts them before its own. Only a
lane that scores with early-exit captures (DoLa's prompt scoring, which needs every layer's
states at every position in one forward) is not chunked.
"""

from __future__ import annotations

from steerserve.decoding.engine.state import Sequence
from steerserve.decoding.model import forward
from steerserve.decoding.model.hosted import HostedModel
from steerserve.decoding.model.slot_table import Lane


def rest(lane: Lane) -> int:
    return len(lane.prompt_ids) - lane.reused


def needs_chunks(s: Sequence, budget: int) -> bool:
    lanes = s.unique_lanes
    return (not any(lane.wants_prompt_logits and lane.capture_layers for lane in lanes)
            and max(rest(lane) for lane in lanes) > budget)


def prefill_chunk(models: dict[str, HostedModel], s: Sequence, budget: int) -> None:
    """The next `budget` tokens of every lane whose rest is longer than one budget."""
    by_model: dict[str, list[Lane]] = {}
    for lane in s.unique_lanes:
        if rest(lane) > budget:  # leaves at least one token: the last position must run
            by_model.setdefault(lane.spec.model, []).append(lane)
    for name, lanes in by_model.items():
        for run in forward.slot_runs(lanes):
            forward.prefill_part(models[name], run, [lane.reused + budget for lane in run])
