"""Requests' lane logits -> one row per request (the sampler's input), and per prompt position
for scoring. Every request's row is one call term of `kernels.combine.combine_lanes`, so a
batch mixing methods (and plain requests) combines in one call, whatever the methods are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from steerserve.decoding.methods.base import DecodingMethod, EarlyExits, LaneView, Mix, Term
from steerserve.kernels.combine.ops import combine_aligned, combine_lanes

Member = tuple[DecodingMethod, LaneView]


class _Table:
    """The stacked (L, V) rows of one combine call, each distinct row once."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.tensors: list[torch.Tensor] = []
        self.temperatures: list[float] = []
        self._index: dict[tuple, int] = {}

    def add(self, key: tuple, rows: Callable[[], torch.Tensor], temperature: float) -> int:
        """Rows (V,) or (N, V) named `key` (a lane used twice is stacked once); the index of
        the first one."""
        if key not in self._index:
            self._index[key] = sum(len(t) for t in self.tensors)
            block = fit(rows(), self.width)
            self.tensors.append(block.unsqueeze(0) if block.dim() == 1 else block)
            self.temperatures.extend([temperature] * len(self.tensors[-1]))
        return self._index[key]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.cat(self.tensors).float().contiguous()
        return rows, torch.tensor(self.temperatures, device=rows.device)


def fit(logits: torch.Tensor, width: int) -> torch.Tensor:
    """A larger expert vocabulary loses its extra trailing rows (the reference's rule); a
    smaller one (only in mixed batches of different models) is padded with -inf."""
    if logits.shape[-1] >= width:
        return logits[..., :width]
    pad = logits.new_full((*logits.shape[:-1], width - logits.shape[-1]), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


class _Calls:
    """Per output row: table indices, weights, plausible row and mask of one combine call."""

    def __init__(self) -> None:
        self.index: list[list[int]] = []
        self.weights: list[list[float]] = []
        self.plausible: list[int] = []
        self.mixes: list[Mix] = []

    def add(self, mix: Mix, index: list[int], plausible: int) -> None:
        self.index.append(index)
        self.weights.append([term.weight for term in mix.terms])
        self.plausible.append(plausible)
        self.mixes.append(mix)

    def run(self, table: _Table) -> torch.Tensor:
        rows, temperatures = table.stacked()
        device, count = rows.device, len(self.index)
        width = max(len(index) for index in self.index)
        lane_index = torch.full((count, width), -1, dtype=torch.int32)
        weight = torch.zeros(count, width)
        for r, (index, weights) in enumerate(zip(self.index, self.weights, strict=True)):
            lane_index[r, : len(index)] = torch.tensor(index, dtype=torch.int32)
            weight[r, : len(weights)] = torch.tensor(weights)
        log_softmax = torch.tensor([mix.log_softmax for mix in self.mixes], device=device)
        plausible = torch.tensor(self.plausible, dtype=torch.int32, device=device)
        alpha = torch.tensor([mix.alpha for mix in self.mixes], device=device)
        return combine_lanes(rows, temperatures, lane_index.to(device), weight.to(device),
                             log_softmax, plausible, alpha)


def _source(term: Term, view: LaneView, derived: torch.Tensor | None, table: _Table,
            lane_rows: Callable[[int], torch.Tensor]) -> int:
    if term.source == "derived":
        return table.add(("derived", id(view), term.index),
                         lambda: derived[..., term.index, :], 1.0)
    temperature = view.temperature(term.index)
    return table.add(("lane", view.key(term.index), temperature),
                     lambda: lane_rows(term.index), temperature)


def _indices(mix: Mix, view: LaneView, derived: torch.Tensor | None, table: _Table,
             lane_rows: Callable[[int], torch.Tensor]) -> tuple[list[int], int]:
    index = [_source(term, view, derived, table, lane_rows) for term in mix.terms]
    plausible = -1 if mix.plausible is None else _source(
        Term("lane", mix.plausible, 1.0), view, None, table, lane_rows)
    return index, plausible


def _derived_rows(members: list[Member], early_exits: EarlyExits) -> list[torch.Tensor | None]:
    """Each method's step_rows, called once per method class for all its requests."""
    rows: list[torch.Tensor | None] = [None] * len(members)
    by_class: dict[type, list[int]] = {}
    for i, (method, _) in enumerate(members):
        by_class.setdefault(type(method), []).append(i)
    for cls, group in by_class.items():
        found = cls.step_rows([members[i] for i in group], early_exits)
        for i, derived in zip(group, found, strict=True):
            rows[i] = derived
    return rows


def next_token_rows(members: list[Member], early_exits: EarlyExits, width: int) -> torch.Tensor:
    """(R, V) float32 rows to sample from, one per request. Rows whose mix is the identity
    (plain requests) skip the combine, whatever else is in the batch: combining every row
    cost a 32-row step 28 ms when five of them ran DoLa (docs/benchmarks.md)."""
    mixes = [method.mix() for method, _ in members]
    out = torch.stack([fit(view.logits(0), width) for _, view in members]).float()
    mixed = [i for i, mix in enumerate(mixes) if not mix.is_identity]
    if not mixed:
        return out
    derived = _derived_rows([members[i] for i in mixed], early_exits)
    table, calls = _Table(width), _Calls()
    for i, rows in zip(mixed, derived, strict=True):
        view = members[i][1]
        calls.add(mixes[i], *_indices(mixes[i], view, rows, table, view.logits))
    out[mixed] = calls.run(table)
    return out


def prompt_rows(method: DecodingMethod, view: LaneView, count: int,
                early_exits: EarlyExits) -> torch.Tensor | None:
    """(count, V) scoring rows for the request's last `count` prompt positions (P - 1 of
    them): each lane is aligned on the request's prompt by its suffix (SH2's hesitation lane
    carries a prefix), all positions combined at once."""
    if count <= 0:
        return None
    mix = method.mix()
    if mix.is_identity:
        return view.prompt_logits(0)[-count:]
    derived = method.prompt_rows(view, count, early_exits)  # (count, D, V) or None
    width = view.prompt_logits(0).shape[-1]

    def block(term: Term) -> torch.Tensor:
        if term.source == "derived":
            return fit(derived[:, term.index], width).float()
        return fit(view.prompt_logits(term.index)[-count:], width).float()

    def temperature(term: Term) -> float:
        return 1.0 if term.source == "derived" else view.temperature(term.index)

    plausible = None if mix.plausible is None else Term("lane", mix.plausible, 1.0)
    return combine_aligned(  # every position combines the same lanes: blocks, no table
        [block(term) for term in mix.terms], [temperature(term) for term in mix.terms],
        [term.weight for term in mix.terms], mix.log_softmax,
        block(plausible) if plausible else None,
        temperature(plausible) if plausible else 1.0, mix.alpha)
