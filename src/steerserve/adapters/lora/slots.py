"""Which adapter occupies which LoRA slot: pinned while lanes use it, LRU among idle ones."""

from __future__ import annotations

from typing import Protocol

import torch

from steerserve.adapters.lora.bank import LoraBank


class AdapterWeights(Protocol):
    """What the engine needs of a loaded adapter (adapters.lora_files.LoraAdapter)."""

    name: str
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


class LoraSlots:
    def __init__(self, bank: LoraBank) -> None:
        self.bank = bank
        size = bank.num_slots
        self._occupant: list[AdapterWeights | None] = [None] * size
        self._users = [0] * size
        self._last_used = [0] * size
        self._clock = 0

    def acquire(self, adapter: AdapterWeights) -> int | None:
        """Pin a slot holding `adapter`, loading it (evicting the least recently used idle
        adapter) if needed. None when every slot is pinned: the lane must wait."""
        slot = self._resident(adapter)
        if slot is None:
            slot = self._free_slot()
            if slot is None:
                return None
            self.bank.write_slot(slot, adapter.weights, adapter.scaling)
            self._occupant[slot] = adapter
        self._users[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self._users[slot] -= 1
        self._clock += 1
        self._last_used[slot] = self._clock

    def _resident(self, adapter: AdapterWeights) -> int | None:
        # Identity, not name: an adapter unloaded and loaded again is a new object.
        return next((i for i, a in enumerate(self._occupant) if a is adapter), None)

    def _free_slot(self) -> int | None:
        idle = [i for i in range(len(self._users)) if self._users[i] == 0]
        if not idle:
            return None
        empty = [i for i in idle if self._occupant[i] is None]
        return empty[0] if empty else min(idle, key=lambda i: self._last_used[i])

    def resident_names(self) -> list[str]:
        return [a.name for a in self._occupant if a is not None]
