"""A runner's decode inputs: index tensors allocated once, at the lane count, filled in place.

Every decode step writes its rows' tokens, positions and adapter slots into the first rows of
one (3, slots) buffer through a numpy view of the same memory, and the forward reads views of
it: no index tensor is built per step, and every shape a forward sees is a prefix of one
fixed-size allocation (what a compiled or captured step needs). The slot numbers the KV
cache writes into are a slice of one arange made at start. On an accelerator the filled part
is copied to it once per step. Engine thread only: the next step overwrites the buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOKENS, POSITIONS, ADAPTERS = range(3)


@dataclass(frozen=True)
class DecodeRows:
    """Views for rows first_slot.. of one decode forward."""

    tokens: torch.Tensor  # (B,) int64: each row's next input token
    positions: torch.Tensor  # (B,) int64: where that token goes in its slot
    adapters: torch.Tensor  # (B,) int64: each row's LoRA slot, -1 for none
    slots: torch.Tensor  # (B,) int64: the rows' KV-cache slots
    kv_len: int  # keys the batch reads: its longest row's length


class StepInputs:
    def __init__(self, rows: int, device: torch.device) -> None:
        self.rows = rows
        self.device = device
        self._host = torch.zeros(3, rows, dtype=torch.long,
                                 pin_memory=device.type == "cuda")
        self._fill = self._host.numpy()
        self._slots = torch.arange(rows, device=device)

    def decode(self, first_slot: int, tokens: list[int], positions: list[int],
               adapters: list[int] | None) -> DecodeRows:
        count = len(tokens)
        if first_slot + count > self.rows:
            raise ValueError(f"rows {first_slot}..{first_slot + count - 1} are past the "
                             f"{self.rows} slots")
        self._fill[TOKENS, :count] = tokens
        self._fill[POSITIONS, :count] = positions
        self._fill[ADAPTERS, :count] = -1 if adapters is None else adapters
        filled = self._host[:, :count]
        if self.device.type != "cpu":  # the step's sampling syncs before the next fill
            filled = filled.to(self.device, non_blocking=True)
        return DecodeRows(filled[TOKENS], filled[POSITIONS], filled[ADAPTERS],
                          self._slots[first_slot:first_slot + count], max(positions) + 1)
