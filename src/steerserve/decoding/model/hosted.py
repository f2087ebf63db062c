"""Lanes, and each hosted model's lanes in compact KV-cache slots.

A lane is one token sequence decoded on one hosted model (with an optional LoRA adapter and
steering) and its own KV-cache slot. A request owns one or more lanes; every token it samples
is appended to all of them. A hosted model keeps its lanes in slot order (lanes[i].slot == i),
so a forward over consecutive lanes reads its cache as one view; a leaving lane's slot is
filled by the last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from steerserve.adapters.lora.slots import LoraSlots
from steerserve.adapters.steering.plan import SteeringPlan, decode_plan
from steerserve.decoding.model.info import ModelInfo
from steerserve.decoding.model.loader import LoadedModel
from steerserve.decoding.model.prefix_cache import PrefixCache
from steerserve.decoding.model.runner import ModelRunner
from steerserve.decoding.request import LaneSpec

if TYPE_CHECKING:
    from steerserve.decoding.engine.state import Sequence


@dataclass(eq=False)
class Lane:
    spec: LaneSpec
    owner: Sequence
    slot: int = -1
    lora_slot: int = -1
    prefilled: bool = False
    fed: int = 0  # the owner's output tokens already in this lane's cache
    wants_prompt_logits: bool = False
    capture_layers: tuple[int, ...] = ()  # block outputs kept at the sampled position(s)
    reused: int = 0  # prompt tokens already in its slot (prefix cache, earlier chunks)
    from_cache: int = 0  # of those, the ones copied from the prefix cache
    written: int = 0  # positions its slot may hold data at (padding included): zeroed on leave

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.spec.prompt_ids

    @property
    def cached_length(self) -> int:
        return len(self.spec.prompt_ids) + self.fed

    @property
    def next_token(self) -> int:
        return self.owner.output_ids[self.fed]


def shares_prefixes(lane: Lane) -> bool:
    """Keys that depend on the tokens alone (no adapter, no steering), and no need for every
    prompt position's logits."""
    spec = lane.spec
    return spec.adapter is None and spec.steering is None and not lane.wants_prompt_logits


class HostedModel:
    """One hosted model: its runner, LoRA slots and the lanes in its KV-cache slots."""

    def __init__(self, loaded: LoadedModel, runner: ModelRunner,
                 lora_slots: LoraSlots | None) -> None:
        """The runner's slots past its lane slots hold the prefix cache."""
        self.name = loaded.name
        self.loaded = loaded
        self.runner = runner
        self.lora_slots = lora_slots
        self.info = ModelInfo.of(loaded, runner.vocab_size)
        total = runner.cache.shape.num_slots
        self.prefix_cache = PrefixCache(runner.cache, range(runner.lane_slots, total)) \
            if total > runner.lane_slots else None
        self.lanes: list[Lane] = []
        self.reserved = 0  # slots promised to lanes that join after a prefill (late lanes)
        self._decode_plan: tuple[tuple, SteeringPlan | None] = ((), None)

    @property
    def num_slots(self) -> int:
        return self.runner.lane_slots

    def reuse_prefix(self, lane: Lane) -> None:
        """A plain lane starts from the prefix cache's longest match (copied into its slot)."""
        if self.prefix_cache is not None and shares_prefixes(lane):
            lane.reused = lane.from_cache = self.prefix_cache.reuse(lane.prompt_ids, lane.slot)

    def remember_prefix(self, lane: Lane) -> None:
        if self.prefix_cache is not None and shares_prefixes(lane):
            self.prefix_cache.remember(lane.prompt_ids, lane.slot)

    @property
    def free_slots(self) -> int:
        return self.num_slots - len(self.lanes) - self.reserved

    def add(self, lane: Lane) -> None:
        lane.slot = len(self.lanes)
        self.lanes.append(lane)

    def steering_for_decode(self, lanes: list[Lane]) -> SteeringPlan | None:
        """Rebuilt only when the decoding lanes change (their order is the batch order)."""
        specs = [lane.spec.steering for lane in lanes]
        key = tuple(specs)  # specs compare by identity, and the key keeps them alive
        if key != self._decode_plan[0]:
            self._decode_plan = (key, decode_plan(specs, self.loaded.device))
        return self._decode_plan[1]

    def release(self, leaving: list[Lane]) -> None:
        """Drop lanes, refill their slots with the last lanes (fewest copies), free LoRA.
        Every position a lane may have written is zeroed once its slot is free (one past
        its length: a step computed again may have written there)."""
        gone = {id(lane) for lane in leaving}
        keep = len(self.lanes) - len(gone)
        cache = self.runner.cache
        for lane in leaving:
            cache.clear(lane.slot, max(lane.written, lane.cached_length + 1))
        holes = sorted(lane.slot for lane in leaving if lane.slot < keep)
        movers = [lane for lane in self.lanes[keep:] if id(lane) not in gone]
        for hole, lane in zip(holes, movers, strict=True):
            if lane.prefilled or lane.reused:  # a prefix may be in the slot before prefill
                self.runner.move_slot(lane.slot, hole,
                                      lane.cached_length if lane.prefilled else lane.reused)
            cache.clear(lane.slot, max(lane.written, lane.cached_length + 1))
            lane.slot = hole
        self.lanes = sorted((lane for lane in self.lanes if id(lane) not in gone),
                            key=lambda lane: lane.slot)
        for lane in leaving:
            lane.slot = -1
            if lane.lora_slot >= 0:
                self.lora_slots.release(lane.lora_slot)
                lane.lora_slot = -1
