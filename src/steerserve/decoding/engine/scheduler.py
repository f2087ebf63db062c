"""Admission: waiting requests become running sequences while the prefill budget allows.

Slots belong to hosted models (decoding/model/hosted.py); `place` returns None when a
request's lanes cannot all get one now (or its LoRA adapter has no slot), and admission
stops there. A request whose placement raises is handed to `refuse` and dropped. A prompt
longer than the budget waits in `warming` while the engine prefills it a chunk per step
(decoding/engine/chunking.py), then joins the running ones.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from steerserve.decoding.engine.chunking import needs_chunks
from steerserve.decoding.engine.inbox import Submit
from steerserve.decoding.engine.state import Sequence


class Scheduler:
    def __init__(self, max_prefill_tokens: int) -> None:
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Submit] = deque()
        self.running: list[Sequence] = []
        self.warming: deque[Sequence] = deque()  # placed, prefilled a chunk per step

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.warming)

    @property
    def num_placed(self) -> int:
        return len(self.running) + len(self.warming)

    def admit(self, place: Callable[[Submit], Sequence | None],
              refuse: Callable[[Submit, Exception], None]) -> list[Sequence]:
        """Admit in arrival order while the padded prefill batch stays within budget; a
        prompt longer than the budget goes to `warming` instead."""
        admitted: list[Sequence] = []
        width = 0
        while self.waiting:
            length = max(len(spec.prompt_ids) for spec in self.waiting[0].request.lanes)
            new_width = max(width, length)
            if admitted and new_width * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            try:
                sequence = place(self.waiting[0])
            except Exception as exc:  # this request only: the queue goes on
                refuse(self.waiting.popleft(), exc)
                continue
            if sequence is None:
                break
            self.waiting.popleft()
            if needs_chunks(sequence, self.max_prefill_tokens):
                self.warming.append(sequence)
                continue
            width = new_width
            admitted.append(sequence)
        self.running.extend(admitted)
        return admitted

    def remove_waiting(self, request_id: str) -> Submit | None:
        for submitted in self.waiting:
            if submitted.request.request_id == request_id:
                self.waiting.remove(submitted)
                return submitted
        return None

    def join_warmed(self) -> Sequence | None:
        """The oldest warming request, once the rest of its prompt fits one prefill."""
        if self.warming and not needs_chunks(self.warming[0], self.max_prefill_tokens):
            s = self.warming.popleft()
            self.running.append(s)
            return s
        return None

    def find_running(self, request_id: str) -> Sequence | None:
        return next((s for s in (*self.running, *self.warming) if s.request_id == request_id),
                    None)

    def release(self, leaving: list[Sequence]) -> None:
        gone = {id(s) for s in leaving}
        self.running = [s for s in self.running if id(s) not in gone]
        self.warming = deque(s for s in self.warming if id(s) not in gone)
