"""One hosted model's forwards for a step: decode its prefilled lanes, prefill the others.

Each group is cut into runs of consecutive slots and each run is one batched forward,
whatever requests its lanes belong to (in a normal step: one decode over slots 0..k-1, one
prefill over the lanes that joined). Results are returned per lane and nothing on the lanes
changes here, so a step that fails can be run again (decoding/engine/isolation.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from steerserve.adapters.steering.plan import prefill_plan
from steerserve.adapters.steering.spec import SteerTarget
from steerserve.decoding.model.capture import Capture
from steerserve.decoding.model.hosted import HostedModel
from steerserve.decoding.model.slot_table import Lane


@dataclass
class LaneResult:
    logits: torch.Tensor  # (V,) next-token logits
    hidden: torch.Tensor  # (C,) the final (normed) hidden state they come from
    prompt_logits: torch.Tensor | None = None  # (P - 1, V) when the lane keeps them
    early: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (C,) or (P, C)


Results = dict[Lane, LaneResult]


def run(hosted: HostedModel, lanes: list[Lane], feed: dict[Lane, int]) -> Results:
    """`feed`: the token each prefilled lane takes next (its request's newest)."""
    results: Results = {}
    for group in slot_runs([lane for lane in lanes if lane.prefilled]):
        results.update(decode(hosted, group, [feed[lane] for lane in group]))
    for group in slot_runs([lane for lane in lanes if not lane.prefilled]):
        results.update(prefill(hosted, group))
    return results


def slot_runs(lanes: list[Lane]) -> list[list[Lane]]:
    """Lanes in slot order, split wherever a slot is skipped."""
    runs: list[list[Lane]] = []
    for lane in sorted(lanes, key=lambda lane: lane.slot):
        if runs and runs[-1][-1].slot + 1 == lane.slot:
            runs[-1].append(lane)
        else:
            runs.append([lane])
    return runs


def _early_exit_capture(lanes: list[Lane], positions: list[int | None],
                        device: torch.device) -> Capture | None:
    """Lanes that keep block outputs: at the sampled position, or at every position (None)
    when the lane also scores its prompt. One capture covers one kind of lane."""
    rows = [i for i, lane in enumerate(lanes) if lane.capture_layers]
    if not rows:
        return None
    layers = frozenset(layer for i in rows for layer in lanes[i].capture_layers)
    whole = positions[rows[0]] is None
    picked = None if whole else torch.tensor([positions[i] for i in rows], device=device)
    return Capture(layers, SteerTarget.RESIDUAL, picked, torch.tensor(rows, device=device))


def _early(lanes: list[Lane], capture: Capture | None) -> list[dict[int, torch.Tensor]]:
    """Per lane, what the capture kept of its own layers."""
    early: list[dict[int, torch.Tensor]] = [{} for _ in lanes]
    if capture is None:
        return early
    for k, row in enumerate(capture.rows.tolist()):
        early[row] = {layer: found[k] for layer, found in capture.found.items()
                      if layer in lanes[row].capture_layers}
    return early


def decode(hosted: HostedModel, lanes: list[Lane], tokens: list[int]) -> Results:
    """Lanes in consecutive slots, each feeding its token."""
    device = hosted.loaded.device
    capture = _early_exit_capture(lanes, [0] * len(lanes), device)
    out = hosted.runner.decode(lanes[0].slot, tokens,
                               [lane.cached_length for lane in lanes],
                               [lane.lora_slot for lane in lanes],
                               hosted.steering_for_decode(lanes), capture)
    early = _early(lanes, capture)
    return {lane: LaneResult(out.logits[row], out.hidden[row], None, early[row])
            for row, lane in enumerate(lanes)}


def prefill(hosted: HostedModel, lanes: list[Lane]) -> Results:
    """Lanes in consecutive slots, prompts right-padded; a lane with a reused prefix (already
    in its slot) prefills only the rest of its prompt."""
    device = hosted.loaded.device
    prompts = [list(lane.prompt_ids[lane.reused:]) for lane in lanes]
    lengths = [len(p) for p in prompts]
    steering = prefill_plan([lane.spec.steering for lane in lanes], lengths, max(lengths),
                            device)
    whole = any(lane.capture_layers and lane.wants_prompt_logits for lane in lanes)
    capture = _early_exit_capture(lanes, [None if whole else n - 1 for n in lengths], device)
    out = hosted.runner.prefill(lanes[0].slot, prompts,
                                [lane.wants_prompt_logits for lane in lanes],
                                [lane.lora_slot for lane in lanes], steering, capture,
                                starts=[lane.reused for lane in lanes])
    width = max(lengths)
    for lane in lanes:  # padding included: all of it is zeroed when the lane leaves
        lane.written = max(lane.written, lane.reused + width)
    early = _early(lanes, capture)
    if whole:  # (P, C) for scoring, without the padding; the sampled position is the last
        early = [{layer: h[:n] for layer, h in kept.items()}
                 for kept, n in zip(early, lengths, strict=True)]
    return {lane: LaneResult(out.last_logits[row], out.last_hidden[row],
                             _whole_prompt(lane, out.prompt_logits[row]), early[row])
            for row, lane in enumerate(lanes)}


def _whole_prompt(lane: Lane, rest: torch.Tensor | None) -> torch.Tensor | None:
    """A scored lane's (P - 1, V) prompt logits: its chunks' before its last prefill's."""
    if rest is None or not lane.scored:
        return rest
    return torch.cat([*lane.scored, rest])


def prefill_part(hosted: HostedModel, lanes: list[Lane], ends: list[int]) -> None:
    """Prompt tokens reused..ends[i]-1 of each lane (consecutive slots) into its slot, nothing
    sampled: a long prompt prefilled a chunk a step. Each lane's `reused` moves to its end."""
    prompts = [list(lane.prompt_ids[lane.reused:end]) for lane, end in zip(lanes, ends,
                                                                            strict=True)]
    lengths = [len(p) for p in prompts]
    steering = prefill_plan([lane.spec.steering for lane in lanes], lengths, max(lengths),
                            hosted.loaded.device, ends_prompt=False)
    out = hosted.runner.prefill(lanes[0].slot, prompts,
                                [lane.wants_prompt_logits for lane in lanes],
                                [lane.lora_slot for lane in lanes], steering,
                                starts=[lane.reused for lane in lanes])
    width = max(lengths)
    for row, (lane, end) in enumerate(zip(lanes, ends, strict=True)):
        lane.written = max(lane.written, lane.reused + width)
        lane.reused = end
        if lane.wants_prompt_logits:  # every position of the chunk predicts a prompt token
            lane.scored.append(torch.cat([out.prompt_logits[row],
                                          out.last_logits[row:row + 1]]))
