"""Placing a request's lanes: whether it can ever run here, slots and LoRA slots when it is
admitted, and freeing them when it leaves (late lanes: decoding/engine/late_lanes.py)."""

from __future__ import annotations

from enum import Enum

import torch

from steerserve.decoding.engine.detokenizer import IncrementalDetokenizer
from steerserve.decoding.engine.state import Sequence, flag_lanes
from steerserve.decoding.model.hosted import HostedModel
from steerserve.decoding.model.slot_table import Lane
from steerserve.decoding.request import EngineRequest, LaneSpec, OutputSink
from steerserve.decoding.sampling.history import TokenHistory


class Wait(Enum):
    """Why a request cannot be placed now."""

    SLOTS = "KV-cache slots"  # its models' slots are taken: the queue behind it waits too
    ADAPTER = "LoRA slots"  # every adapter slot is pinned: adapter-free requests may pass


class Inadmissible(ValueError):
    """The request can never run on this engine: `field` is the request field at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


def unique_specs(specs: tuple[LaneSpec, ...]) -> list[LaneSpec]:
    unique: list[LaneSpec] = []
    for spec in specs:
        if not any(spec.same_as(u) for u in unique):
            unique.append(spec)
    return unique


def _check_token_ids(spec: LaneSpec, vocab_size: int, multi_lane: bool) -> None:
    """An id past the embedding table fails the forward: on a CPU with an IndexError inside
    the step; on a GPU with a device-side assert that ends the process's CUDA context."""
    low, high = min(spec.prompt_ids), max(spec.prompt_ids)
    if low < 0 or high >= vocab_size:
        raise Inadmissible(f"prompt token id {low if low < 0 else high} is outside the "
                           f"vocabulary of '{spec.model}' (0..{vocab_size - 1})",
                           "decoding" if multi_lane else "prompt")


class Admission:
    def __init__(self, models: dict[str, HostedModel]) -> None:
        self.models = models

    # ---- before it is queued (any thread) --------------------------------------------------
    def check(self, request: EngineRequest) -> None:
        """Raise Inadmissible when the request could never be admitted or would trip a step:
        an unknown model, a lane prompt past its model's context or with a token id outside
        its vocabulary, more lanes or adapters than the model holds at once."""
        unique = unique_specs(request.lanes)
        lanes: dict[str, int] = {}
        adapters: dict[str, set[int]] = {}
        for spec in unique:
            hosted = self.models.get(spec.model)
            if hosted is None:
                raise Inadmissible(f"model '{spec.model}' is not hosted here", "model")
            if not 0 < len(spec.prompt_ids) < hosted.info.max_model_len:
                raise Inadmissible(f"a lane on '{spec.model}' has {len(spec.prompt_ids)} prompt "
                                   f"tokens; that model's context is {hosted.info.max_model_len}"
                                   " tokens", "decoding" if len(request.lanes) > 1 else "prompt")
            _check_token_ids(spec, hosted.info.vocab_size, len(request.lanes) > 1)
            lanes[spec.model] = lanes.get(spec.model, 0) + 1
            if spec.adapter is not None:
                adapters.setdefault(spec.model, set()).add(id(spec.adapter))
        lanes[request.model] = lanes.get(request.model, 0) + request.method.late_lanes
        for name, count in lanes.items():
            self._check_capacity(name, count, len(adapters.get(name, ())))

    def _check_capacity(self, name: str, lanes: int, adapters: int) -> None:
        hosted = self.models[name]
        if lanes > hosted.slots.num_slots:
            raise Inadmissible(f"this request needs {lanes} KV-cache slots on '{name}', which "
                               f"has {hosted.slots.num_slots} (--max-num-seqs)", "decoding")
        if adapters and hosted.lora_slots is None:
            raise Inadmissible(f"model '{name}' runs no LoRA adapters", "model")
        if adapters and adapters > hosted.lora_slots.bank.num_slots:
            raise Inadmissible(f"this request uses {adapters} LoRA adapters at once; the server "
                               f"holds at most {hosted.lora_slots.bank.num_slots} (--max-loras)",
                               "decoding")

    # ---- engine thread -----------------------------------------------------------------------
    def place(self, request: EngineRequest, sink: OutputSink) -> Sequence | Wait:
        """The request's lanes in free slots of their models, or why it must wait.
        Everything that can raise runs before a slot or an adapter is taken."""
        specs = request.lanes
        unique = unique_specs(specs)
        if not self._slots_available(unique, request):
            return Wait.SLOTS
        sequence = self._sequence(request, sink)
        lanes = [Lane(spec) for spec in unique]
        sequence.lanes = [next(lane for lane in lanes if lane.spec.same_as(spec))
                          for spec in specs]
        sequence.lane_temperatures = [spec.temperature for spec in specs]
        flag_lanes(sequence)
        lora = self._acquire_lora(unique)
        if lora is None:
            return Wait.ADAPTER  # every LoRA slot is pinned by running lanes
        for lane, slot in zip(lanes, lora, strict=True):
            lane.lora_slot = slot
            hosted = self.models[lane.spec.model]
            hosted.slots.add(lane)
            hosted.slots.reuse_prefix(lane)
        sequence.late_pending = request.method.late_lanes
        self.models[request.model].slots.reserve(sequence.late_pending)
        return sequence

    def _slots_available(self, unique: list[LaneSpec], request: EngineRequest) -> bool:
        needed = {request.model: request.method.late_lanes}
        for spec in unique:
            needed[spec.model] = needed.get(spec.model, 0) + 1
        return all(self.models[name].slots.free >= count for name, count in needed.items())

    def _acquire_lora(self, unique: list[LaneSpec]) -> list[int] | None:
        taken: list[tuple[HostedModel | None, int]] = []
        for spec in unique:
            if spec.adapter is None:
                taken.append((None, -1))
                continue
            hosted = self.models[spec.model]
            slot = hosted.lora_slots.acquire(spec.adapter)
            if slot is None:
                for owner, held in taken:
                    if held >= 0:
                        owner.lora_slots.release(held)
                return None
            taken.append((hosted, slot))
        return [slot for _, slot in taken]

    def _sequence(self, request: EngineRequest, sink: OutputSink) -> Sequence:
        params = request.sampling
        hosted = self.models[request.model]
        generator = None
        if params.seed is not None:
            generator = torch.Generator(hosted.loaded.device).manual_seed(params.seed)
        detokenizer = IncrementalDetokenizer.for_prompt(
            hosted.info.tokenizer, list(request.prompt_ids), stop=params.stop,
            include_stop=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens)
        history = TokenHistory.for_request(params, request.prompt_ids, hosted.info.vocab_size,
                                           hosted.loaded.device)
        grammar = params.grammar.start() if params.grammar is not None else None
        return Sequence(request, sink, detokenizer, generator, eos_ids=hosted.info.eos_ids,
                        history=history, grammar=grammar)

    # ---- leaving -------------------------------------------------------------------------------
    def release(self, leaving: list[Sequence]) -> None:
        """Free every lane of the leaving requests (slots compacted per hosted model)."""
        by_model: dict[str, list[Lane]] = {}
        for s in leaving:
            for lane in s.unique_lanes:
                if lane.slot >= 0:
                    by_model.setdefault(lane.spec.model, []).append(lane)
            self.models[s.request.model].slots.unreserve(s.late_pending)
            s.late_pending = 0
        for name, lanes in by_model.items():
            self.models[name].slots.release(lanes)
