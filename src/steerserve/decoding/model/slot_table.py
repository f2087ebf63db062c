"""Lanes, and the one table per hosted model that owns their slots.

A lane is one token sequence decoded on one hosted model (with an optional LoRA adapter and
steering) in its own KV-cache slot; a request owns one or more lanes and feeds every token
it samples to all of them. The slot table is the only place that assigns, moves and frees
slots: it keeps its lanes in slot order (lanes[i].slot == i), so a forward over consecutive
lanes reads the cache as one view, fills a leaving lane's slot with the last lane, holds the
slots promised to late lanes, and copies prompts in and out of the prefix cache. It knows
nothing of requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from steerserve.adapters.lora.slots import LoraSlots
from steerserve.decoding.model.kv_cache import SlotKVCache
from steerserve.decoding.model.prefix_cache import PrefixCache, Scope
from steerserve.decoding.request import LaneSpec


@dataclass(eq=False)
class Lane:
    spec: LaneSpec
    slot: int = -1
    lora_slot: int = -1
    prefilled: bool = False
    fed: int = 0  # its request's output tokens already in this lane's cache
    wants_prompt_logits: bool = False
    capture_layers: tuple[int, ...] = ()  # block outputs kept at the sampled position(s)
    reused: int = 0  # prompt tokens already in its slot (prefix cache, earlier chunks)
    from_cache: int = 0  # of those, the ones copied from the prefix cache
    written: int = 0  # positions its slot may hold data at (padding included): zeroed on leave
    scored: list[torch.Tensor] = field(default_factory=list)  # earlier chunks' prompt logits

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.spec.prompt_ids

    @property
    def cached_length(self) -> int:
        return len(self.spec.prompt_ids) + self.fed


def prefix_scope(lane: Lane) -> Scope | None:
    """Whose cached prefixes the lane may use and add to; None: none (it needs every prompt
    position's logits)."""
    if lane.wants_prompt_logits:
        return None
    steering = lane.spec.steering
    return Scope(lane.spec.adapter, steering.prompt_digest if steering else None)


def cacheable_prompt(lane: Lane) -> tuple[int, ...]:
    """The prompt positions whose keys another lane of its scope may use: all of them, but
    the last where an edit of generated tokens acted on it."""
    steering = lane.spec.steering
    if steering and steering.edits_last_prompt_position:
        return lane.prompt_ids[:-1]
    return lane.prompt_ids


class SlotTable:
    def __init__(self, cache: SlotKVCache, num_slots: int, lora_slots: LoraSlots | None) -> None:
        """Slots 0..num_slots-1 hold lanes; the cache's slots past them, the prefix cache."""
        self.cache = cache
        self.num_slots = num_slots
        self.lora_slots = lora_slots
        total = cache.shape.num_slots
        self.prefix_cache = PrefixCache(cache, range(num_slots, total)) \
            if total > num_slots else None
        self.lanes: list[Lane] = []
        self.reserved = 0  # slots promised to lanes that join after a prefill (late lanes)

    @property
    def free(self) -> int:
        return self.num_slots - len(self.lanes) - self.reserved

    def reserve(self, count: int) -> None:
        self.reserved += count

    def unreserve(self, count: int) -> None:
        self.reserved -= count

    def add(self, lane: Lane) -> None:
        lane.slot = len(self.lanes)
        self.lanes.append(lane)

    def reuse_prefix(self, lane: Lane) -> None:
        """A lane starts from the longest match of its scope (copied into its slot)."""
        scope = prefix_scope(lane)
        if self.prefix_cache is not None and scope is not None:
            lane.reused = lane.from_cache = self.prefix_cache.reuse(lane.prompt_ids, lane.slot,
                                                                    scope)

    def remember_prefix(self, lane: Lane) -> None:
        scope = prefix_scope(lane)
        if self.prefix_cache is not None and scope is not None:
            self.prefix_cache.remember(cacheable_prompt(lane), lane.slot, scope)

    def release(self, leaving: list[Lane]) -> None:
        """Drop lanes, refill their slots with the last lanes (fewest copies), free LoRA.
        Every position a lane may have written is zeroed once its slot is free (one past
        its length: a step computed again may have written there)."""
        gone = {id(lane) for lane in leaving}
        keep = len(self.lanes) - len(gone)
        for lane in leaving:
            self.cache.clear(lane.slot, max(lane.written, lane.cached_length + 1))
        holes = sorted(lane.slot for lane in leaving if lane.slot < keep)
        movers = [lane for lane in self.lanes[keep:] if id(lane) not in gone]
        for hole, lane in zip(holes, movers, strict=True):
            if lane.prefilled or lane.reused:  # a prefix may be in the slot before prefill
                self.cache.move_slot(lane.slot, hole,
                                     lane.cached_length if lane.prefilled else lane.reused)
            self.cache.clear(lane.slot, max(lane.written, lane.cached_length + 1))
            lane.slot = hole
        self.lanes = sorted((lane for lane in self.lanes if id(lane) not in gone),
                            key=lambda lane: lane.slot)
        for lane in leaving:
            lane.slot = -1
            if lane.lora_slot >= 0:
                self.lora_slots.release(lane.lora_slot)
                lane.lora_slot = -1
