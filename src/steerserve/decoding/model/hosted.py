"""One hosted model as the engine sees it: its runner, its slot table (the lanes in its KV
slots), its LoRA slots and the steering plan of its current decode batch."""

from __future__ import annotations

from steerserve.adapters.lora.slots import LoraSlots
from steerserve.adapters.steering.plan import SteeringPlan, decode_plan
from steerserve.decoding.model.info import ModelInfo
from steerserve.decoding.model.loader import LoadedModel
from steerserve.decoding.model.runner import ModelRunner
from steerserve.decoding.model.slot_table import Lane, SlotTable


class HostedModel:
    def __init__(self, loaded: LoadedModel, runner: ModelRunner,
                 lora_slots: LoraSlots | None) -> None:
        self.name = loaded.name
        self.loaded = loaded
        self.runner = runner
        self.lora_slots = lora_slots
        self.info = ModelInfo.of(loaded, runner.vocab_size)
        self.slots = SlotTable(runner.cache, runner.lane_slots, lora_slots)
        self._decode_plan: tuple[tuple, SteeringPlan | None] = ((), None)

    def steering_for_decode(self, lanes: list[Lane]) -> SteeringPlan | None:
        """Rebuilt only when the decoding lanes change (their order is the batch order)."""
        specs = [lane.spec.steering for lane in lanes]
        key = tuple(specs)  # specs compare by identity, and the key keeps them alive
        if key != self._decode_plan[0]:
            self._decode_plan = (key, decode_plan(specs, self.loaded.device))
        return self._decode_plan[1]
