"""Late lanes: lanes a decoding method adds once the request's first lane is prefilled
(SH2's hesitation lane). Their slots were reserved when the request was placed; they are
made inside the step that prefills the request, on the model of its first lane, and may use
only adapters the request already holds (so their LoRA slots are resident and pinned)."""

from __future__ import annotations

from steerserve.decoding.engine.state import Sequence, flag_lanes
from steerserve.decoding.methods.base import LaneView
from steerserve.decoding.model.hosted import HostedModel
from steerserve.decoding.model.slot_table import Lane
from steerserve.decoding.request import LaneSpec


def late_lanes(models: dict[str, HostedModel], sequence: Sequence, view: LaneView
               ) -> list[Lane]:
    """Create the method's late lanes once (a step run again finds them made); returns
    those still to prefill."""
    if sequence.late_pending:
        _start(models[sequence.request.model], sequence, view)
    return [lane for lane in sequence.lanes[len(sequence.request.lanes):]
            if not lane.prefilled]


def _start(hosted: HostedModel, sequence: Sequence, view: LaneView) -> None:
    specs = sequence.request.method.after_prefill(view)
    if len(specs) != sequence.late_pending:
        raise ValueError(f"{sequence.request.method.name} promised "
                         f"{sequence.late_pending} late lanes and made {len(specs)}")
    lanes = [Lane(spec, lora_slot=_lora_slot(sequence, spec, hosted)) for spec in specs]
    first = len(sequence.lanes)
    hosted.slots.unreserve(sequence.late_pending)
    sequence.late_pending = 0
    for lane in lanes:
        hosted.slots.add(lane)
        sequence.lanes.append(lane)
        sequence.lane_temperatures.append(lane.spec.temperature)
    flag_lanes(sequence, range(first, len(sequence.lanes)))


def _lora_slot(sequence: Sequence, spec: LaneSpec, hosted: HostedModel) -> int:
    if spec.model != hosted.name:
        raise ValueError("late lanes run on the model of the request's first lane")
    if spec.adapter is None:
        return -1
    if all(lane.spec.adapter is not spec.adapter for lane in sequence.lanes):
        raise ValueError("late lanes may only use adapters the request already holds")
    return hosted.lora_slots.acquire(spec.adapter)  # resident and pinned: never None
