"""One step's forwards for one hosted model: a decode over its running lanes, then a prefill
over the lanes that joined, each a single batch whatever request the lanes belong to."""

from __future__ import annotations

import torch

from steerserve.adapters.steering.plan import Capture, SteeringPlan, prefill_plan
from steerserve.adapters.steering.spec import SteerTarget
from steerserve.decoding.model.hosted import HostedModel, Lane


def _with_capture(plan: SteeringPlan | None, capture: Capture | None) -> SteeringPlan | None:
    if capture is None:
        return plan
    if plan is None:
        return SteeringPlan(capture=capture)
    return SteeringPlan(plan.residual, plan.heads, capture)


def _early_exit_capture(lanes: list[Lane], positions: list[int | None],
                        device: torch.device) -> Capture | None:
    """DoLa lanes: their early-exit layers at the sampled position (all positions when the
    lane also scores its prompt). One capture covers one kind of lane."""
    rows = [i for i, lane in enumerate(lanes) if lane.capture_layers]
    if not rows:
        return None
    layers = frozenset(layer for i in rows for layer in lanes[i].capture_layers)
    whole = positions[rows[0]] is None
    picked = None if whole else torch.tensor([positions[i] for i in rows], device=device)
    return Capture(layers, SteerTarget.RESIDUAL, picked, torch.tensor(rows, device=device))


def _store_early(lanes: list[Lane], capture: Capture | None) -> None:
    if capture is None:
        return
    rows = capture.rows.tolist()
    for k, row in enumerate(rows):
        lanes[row].early = {layer: found[k] for layer, found in capture.found.items()
                            if layer in lanes[row].capture_layers}


def decode(hosted: HostedModel, lanes: list[Lane]) -> None:
    """Lanes in slots 0..len-1, each feeding its owner's newest token."""
    device = hosted.loaded.device
    capture = _early_exit_capture(lanes, [0] * len(lanes), device)
    plan = _with_capture(hosted.steering_for_decode(lanes), capture)
    out = hosted.runner.decode(0, [lane.next_token for lane in lanes],
                               [lane.cached_length for lane in lanes],
                               [lane.lora_slot for lane in lanes], plan)
    for row, lane in enumerate(lanes):
        lane.logits, lane.hidden = out.logits[row], out.hidden[row]
        lane.fed += 1
    _store_early(lanes, capture)


def prefill(hosted: HostedModel, lanes: list[Lane]) -> None:
    """Lanes in consecutive slots from lanes[0].slot, prompts right-padded."""
    device = hosted.loaded.device
    prompts = [list(lane.prompt_ids) for lane in lanes]
    lengths = [len(p) for p in prompts]
    steering = prefill_plan([lane.spec.steering for lane in lanes], lengths, max(lengths),
                            device)
    scoring_dola = any(lane.capture_layers and lane.wants_prompt_logits for lane in lanes)
    positions = [None if scoring_dola else n - 1 for n in lengths]
    capture = _early_exit_capture(lanes, positions, device)
    out = hosted.runner.prefill(lanes[0].slot, prompts,
                                [lane.wants_prompt_logits for lane in lanes],
                                [lane.lora_slot for lane in lanes],
                                _with_capture(steering, capture))
    for row, lane in enumerate(lanes):
        lane.logits, lane.hidden = out.last_logits[row], out.last_hidden[row]
        lane.prompt_logits = out.prompt_logits[row]
        lane.prefilled = True
    _store_early(lanes, capture)
    if scoring_dola:  # keep (P, C) for scoring; the sampled position is the last one
        for lane, n in zip(lanes, lengths, strict=True):
            lane.early = {layer: h[:n] for layer, h in lane.early.items()}


def forward(hosted: HostedModel) -> None:
    """Decode the prefilled lanes (a prefix of the slots), prefill the rest (a suffix)."""
    running = [lane for lane in hosted.lanes if lane.prefilled]
    joining = [lane for lane in hosted.lanes if not lane.prefilled]
    if running:
        decode(hosted, running)
    if joining:
        prefill(hosted, joining)
