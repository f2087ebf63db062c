"""One forward's steering: the per-layer kernel arguments for every row of the batch.

Built once per forward from the rows' SteeringSpecs (None = unsteered row, index -1). A
prefill needs up to two launches per layer: edits on every prompt position, then
generation-only edits on each row's last prompt position (its output is the first sampled
token). A decode step has one position per row, all of it generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from steerserve.adapters.steering.spec import (
    FeatureEdit,
    SteerEdit,
    SteeringSpec,
    SteerMode,
    SteerTarget,
)
from steerserve.kernels.sae.checks import MODE_ADD, MODE_CLAMP


@dataclass(frozen=True)
class ResidualCall:
    """Arguments of one `kernels.steering.steer_residual` launch."""

    vectors: torch.Tensor  # (V, H) fp32
    vector_index: torch.Tensor  # (R, K) int32, -1 = no item
    scale: torch.Tensor  # (R, K) fp32
    mode: torch.Tensor  # (R, K) int8
    normalize: torch.Tensor  # (R,) bool
    position_mask: torch.Tensor | None  # (R, S) bool


@dataclass(frozen=True)
class HeadCall:
    """Arguments of one `kernels.steering.steer_heads` launch."""

    head_offsets: torch.Tensor  # (O, NH, D) fp32, scales already folded in
    offset_index: torch.Tensor  # (R,) int32, -1 = none
    scale: torch.Tensor  # (R,) fp32
    position_mask: torch.Tensor | None  # (R, S) bool


@dataclass(frozen=True)
class FeatureCall:
    """Arguments of one `kernels.sae.sae_edit` launch."""

    encoders: torch.Tensor  # (U, H) fp32
    enc_bias: torch.Tensor  # (U,) fp32
    threshold: torch.Tensor  # (U,) fp32
    decoders: torch.Tensor  # (U, H) fp32
    feature_index: torch.Tensor  # (R, F) int32, -1 = none
    mode: torch.Tensor  # (R, F) int8
    value: torch.Tensor  # (R, F) fp32
    position_mask: torch.Tensor | None  # (R, S) bool


@dataclass
class SteeringPlan:
    """One forward's steering, read at the hook points (adapters/steering/edits.py)."""

    residual: dict[int, list[ResidualCall]] = field(default_factory=dict)
    heads: dict[int, list[HeadCall]] = field(default_factory=dict)
    features: dict[int, list[FeatureCall]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.residual or self.heads or self.features)


RowEdits = list[list[SteerEdit]]  # per row, the edits of one launch group


def _residual_call(rows: RowEdits, mask: torch.Tensor | None,
                   device: torch.device) -> ResidualCall:
    vectors: list[torch.Tensor] = []
    slot: dict[int, int] = {}  # id(vector) -> row in `vectors`: shared vectors sent once
    width = max(len(edits) for edits in rows)
    index = [[-1] * width for _ in rows]
    scale = [[0.0] * width for _ in rows]
    mode = [[0] * width for _ in rows]
    for r, edits in enumerate(rows):
        for k, edit in enumerate(edits):
            key = id(edit.vector)
            if key not in slot:
                slot[key] = len(vectors)
                vectors.append(edit.vector)
            index[r][k], scale[r][k], mode[r][k] = slot[key], edit.scale, int(edit.mode)
    normalize = [any(e.normalize for e in edits) for edits in rows]
    return ResidualCall(
        torch.stack(vectors).to(device), torch.tensor(index, dtype=torch.int32, device=device),
        torch.tensor(scale, dtype=torch.float32, device=device),
        torch.tensor(mode, dtype=torch.int8, device=device),
        torch.tensor(normalize, device=device), mask)


def _head_call(rows: RowEdits, mask: torch.Tensor | None, device: torch.device) -> HeadCall:
    offsets, index = [], []
    for edits in rows:
        if not edits:
            index.append(-1)
            continue
        index.append(len(offsets))  # several head edits on a layer are additive: sum them
        offsets.append(sum(e.scale * e.vector for e in edits))
    return HeadCall(torch.stack(offsets).to(device),
                    torch.tensor(index, dtype=torch.int32, device=device),
                    torch.ones(len(rows), device=device), mask)


def _feature_call(rows: list[list[FeatureEdit]], mask: torch.Tensor | None,
                  device: torch.device) -> FeatureCall:
    unique: dict[tuple[str, int], int] = {}
    features: list[FeatureEdit] = []
    width = max(len(edits) for edits in rows)
    index = [[-1] * width for _ in rows]
    mode = [[0] * width for _ in rows]
    value = [[0.0] * width for _ in rows]
    for r, edits in enumerate(rows):
        for k, edit in enumerate(edits):
            if edit.key not in unique:
                unique[edit.key] = len(features)
                features.append(edit)
            index[r][k], value[r][k] = unique[edit.key], edit.value
            mode[r][k] = MODE_CLAMP if edit.clamp else MODE_ADD
    return FeatureCall(
        torch.stack([f.encoder for f in features]).to(device),
        torch.tensor([f.bias for f in features], dtype=torch.float32, device=device),
        torch.tensor([f.threshold for f in features], dtype=torch.float32, device=device),
        torch.stack([f.decoder for f in features]).to(device),
        torch.tensor(index, dtype=torch.int32, device=device),
        torch.tensor(mode, dtype=torch.int8, device=device),
        torch.tensor(value, dtype=torch.float32, device=device), mask)


def _add_features(plan: SteeringPlan, rows: list[list[FeatureEdit]], mask: torch.Tensor | None,
                  device: torch.device) -> None:
    for layer in sorted({e.layer for edits in rows for e in edits}):
        per_row = [[e for e in edits if e.layer == layer] for edits in rows]
        plan.features.setdefault(layer, []).append(_feature_call(per_row, mask, device))


def _add_group(plan: SteeringPlan, rows: list[list[SteerEdit]], mask: torch.Tensor | None,
               device: torch.device, features: list[list[FeatureEdit]] | None = None) -> None:
    """Group one launch's edits by (target, layer) and append the calls to the plan."""
    if features is not None and any(features):
        _add_features(plan, features, mask, device)
    layers = {(e.target, e.layer) for edits in rows for e in edits}
    for target, layer in sorted(layers):
        per_row = [[e for e in edits if e.target == target and e.layer == layer]
                   for edits in rows]
        if target == SteerTarget.RESIDUAL:
            plan.residual.setdefault(layer, []).append(_residual_call(per_row, mask, device))
        else:
            plan.heads.setdefault(layer, []).append(_head_call(per_row, mask, device))


def _split(specs: list[SteeringSpec | None], keep) -> tuple[RowEdits, list[list[FeatureEdit]]]:
    """Per row, the vector edits and the feature edits that `keep` selects."""
    return ([[e for e in spec.edits if keep(e)] if spec else [] for spec in specs],
            [[e for e in spec.features if keep(e)] if spec else [] for spec in specs])


def decode_plan(specs: list[SteeringSpec | None], device: torch.device) -> SteeringPlan | None:
    """One position per row, every edit that applies to generation."""
    rows, features = _split(specs, lambda e: e.on_generation)
    if not any(rows) and not any(features):
        return None
    plan = SteeringPlan()
    _add_group(plan, rows, None, device, features)
    return plan


def prefill_plan(specs: list[SteeringSpec | None], lengths: list[int], width: int,
                 device: torch.device, ends_prompt: bool = True) -> SteeringPlan | None:
    """Right-padded prompts: padding is never steered. Edits of generated tokens act at the
    prompt's last position (it yields the first one), so not in a chunk that ends earlier."""
    prompt_rows, prompt_features = _split(specs, lambda e: e.on_prompt)
    last_rows, last_features = _split(specs if ends_prompt else [None] * len(specs),
                                      lambda e: not e.on_prompt)
    if not any(prompt_rows + prompt_features + last_rows + last_features):
        return None
    positions = torch.arange(width, device=device)
    length = torch.tensor(lengths, device=device).unsqueeze(1)  # (R, 1)
    plan = SteeringPlan()
    if any(prompt_rows) or any(prompt_features):
        _add_group(plan, prompt_rows, positions < length, device, prompt_features)
    if any(last_rows) or any(last_features):
        _add_group(plan, last_rows, positions == length - 1, device, last_features)
    return plan


def additive_residual(plan: SteeringPlan, layers: int, rows: int, width: int,
                      device: torch.device) -> torch.Tensor | None:
    """A decode plan as one (layers, rows, width) fp32 tensor to add to each block's output,
    when every edit in it adds a vector to the residual stream (no ablation, clamping,
    renormalising, head offsets or SAE features); else None. Several vectors on one row and
    layer are summed first, so their sum rounds once where the kernel rounds per item."""
    if plan.heads or plan.features:
        return None
    offsets = torch.zeros(layers, rows, width, device=device)
    for layer, calls in plan.residual.items():
        for call in calls:
            present = call.vector_index >= 0  # (R, K)
            if (call.position_mask is not None or bool(call.normalize.any())
                    or bool((present & (call.mode != SteerMode.ADD)).any())):
                return None
            picked = call.vectors.float()[call.vector_index.clamp(min=0).long()]  # (R, K, H)
            weights = torch.where(present, call.scale, 0.0).unsqueeze(-1)
            offsets[layer] += (weights * picked).sum(1)
    return offsets
