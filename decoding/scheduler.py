"""Admission and slot bookkeeping: waiting requests become running lanes in compact slots."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from decoding.sequence import GenerationRequest, Sequence


@dataclass(frozen=True)
class SlotMove:
    source: int
    target: int
    length: int


class Scheduler:
    def __init__(self, num_slots: int, max_prefill_tokens: int) -> None:
        self.num_slots = num_slots
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[GenerationRequest] = deque()
        self.running: list[Sequence] = []  # running[i].slot == i

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self, make: Callable[[GenerationRequest], Sequence | None]) -> list[Sequence]:
        """Move waiting requests into free slots while the padded prefill batch stays within
        budget (a single long prompt is always admitted alone). `make` returns None when a
        request cannot start yet (its LoRA adapter has no slot): admission stops there."""
        admitted: list[Sequence] = []
        width = 0
        while self.waiting and len(self.running) + len(admitted) < self.num_slots:
            length = len(self.waiting[0].prompt_ids)
            new_width = max(width, length)
            if admitted and new_width * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            sequence = make(self.waiting[0])
            if sequence is None:
                break
            self.waiting.popleft()
            width = new_width
            sequence.slot = len(self.running) + len(admitted)
            admitted.append(sequence)
        self.running.extend(admitted)
        return admitted

    def remove_waiting(self, request_id: str) -> GenerationRequest | None:
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                return request
        return None

    def find_running(self, request_id: str) -> Sequence | None:
        return next((s for s in self.running if s.request_id == request_id), None)

    def release(self, leaving: list[Sequence]) -> list[SlotMove]:
        """Drop lanes and fill their slots with the last running lanes (fewest copies)."""
        gone = {id(s) for s in leaving}
        keep = len(self.running) - len(gone)
        holes = sorted(s.slot for s in leaving if s.slot < keep)
        movers = [s for s in self.running[keep:] if id(s) not in gone]
        moves = []
        for hole, sequence in zip(holes, movers, strict=True):
            moves.append(SlotMove(sequence.slot, hole, sequence.cached_length))
            sequence.slot = hole
        survivors = [s for s in self.running if id(s) not in gone]
        self.running = sorted(survivors, key=lambda s: s.slot)
        return moves
