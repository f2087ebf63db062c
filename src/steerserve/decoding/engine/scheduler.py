"""Scheduling: which requests run in the next step, as a `StepPlan`.

Waiting requests are placed (their lanes get slots on their models: `Admission.place`) in
arrival order while the padded prefill batch stays within budget; a request whose lanes
cannot all get a KV-cache slot now waits, and the queue behind it waits too. A request
waiting for a LoRA slot lets the adapter-free requests behind it pass (vLLM skips it too);
requests with adapters keep their order behind it, so it is not starved. A request whose
placing raises is refused in the plan. A prompt longer than the budget waits in `warming` while the
engine prefills it a chunk per step (decoding/engine/chunking.py), then joins the running
ones.
"""

from __future__ import annotations

from collections import deque

from steerserve.decoding.engine.admission import Admission, Wait
from steerserve.decoding.engine.chunking import needs_chunks
from steerserve.decoding.engine.inbox import Submit
from steerserve.decoding.engine.plan import StepPlan
from steerserve.decoding.engine.state import Sequence


class Scheduler:
    def __init__(self, admission: Admission, max_prefill_tokens: int) -> None:
        self.admission = admission
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Submit] = deque()
        self.running: list[Sequence] = []
        self.warming: deque[Sequence] = deque()  # placed, prefilled a chunk per step

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.warming)

    @property
    def num_placed(self) -> int:
        return len(self.running) + len(self.warming)

    def plan(self) -> StepPlan:
        """Admit what fits, then either let the oldest long prompt join (its rest fits one
        prefill) or give it its next chunk: one chunk a step, so running streams go on."""
        joining, placed, refused = self._admit()
        joined = self._join_warmed()
        chunk = None
        if joined is not None:
            joining.append(joined)
        elif self.warming:
            chunk = self.warming[0]
        return StepPlan(list(self.running), joining, chunk, placed, refused)

    def _admit(self) -> tuple[list[Sequence], int, list[tuple[Submit, Exception]]]:
        admitted: list[Sequence] = []
        refused: list[tuple[Submit, Exception]] = []
        placed = 0
        width = 0
        index = 0  # past requests waiting for adapter slots, and those that keep their order
        adapters_wait = False
        while index < len(self.waiting):
            submitted = self.waiting[index]
            if adapters_wait and _uses_adapters(submitted):
                index += 1
                continue
            length = max(len(spec.prompt_ids) for spec in submitted.request.lanes)
            new_width = max(width, length)
            if admitted and new_width * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            try:
                sequence = self.admission.place(submitted.request, submitted.sink)
            except Exception as exc:  # this request only: the queue goes on
                del self.waiting[index]
                refused.append((submitted, exc))
                continue
            if sequence is Wait.SLOTS:
                break
            if sequence is Wait.ADAPTER:
                adapters_wait = True
                index += 1
                continue
            del self.waiting[index]
            placed += 1
            if needs_chunks(sequence, self.max_prefill_tokens):
                self.warming.append(sequence)
                continue
            width = new_width
            admitted.append(sequence)
        self.running.extend(admitted)
        return admitted, placed, refused

    def _join_warmed(self) -> Sequence | None:
        if self.warming and not needs_chunks(self.warming[0], self.max_prefill_tokens):
            s = self.warming.popleft()
            self.running.append(s)
            return s
        return None

    def remove_waiting(self, request_id: str) -> Submit | None:
        for submitted in self.waiting:
            if submitted.request.request_id == request_id:
                self.waiting.remove(submitted)
                return submitted
        return None

    def find_running(self, request_id: str) -> Sequence | None:
        return next((s for s in (*self.running, *self.warming) if s.request_id == request_id),
                    None)

    def release(self, leaving: list[Sequence]) -> None:
        gone = {id(s) for s in leaving}
        self.running = [s for s in self.running if id(s) not in gone]
        self.warming = deque(s for s in self.warming if id(s) not in gone)


def _uses_adapters(submitted: Submit) -> bool:
    return any(spec.adapter is not None for spec in submitted.request.lanes)
