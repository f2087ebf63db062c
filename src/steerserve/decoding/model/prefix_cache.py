"""Prefix cache: the prompts of recently prefilled lanes, kept in KV slots of their own.

Each of those slots holds as many prompts as fit, each a span of its positions (a slot is
sized for the longest context; a chat prompt is tens of tokens), up to ENTRIES_PER_SLOT.

A new lane whose prompt starts like one of them (a chat template's system prompt, few-shot
examples, a conversation's earlier turns) copies the keys and values of the common part
and prefills only the rest: a lane's keys at position p depend on tokens 0..p, its LoRA
adapter and the steering of its prompt positions, so any common prefix of two prompts is
valid for two lanes of one `Scope` (vLLM's prefix caching keys its blocks by adapter the same
way). Lanes that score their prompt take no part (they need every position's logits).
Entries are replaced least recently used first; a prompt that extends an entry of its scope
(a conversation's next turn) replaces it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from steerserve.decoding.model.kv_cache import SlotKVCache

MIN_REUSE = 16  # shorter common prefixes are cheaper to prefill than to look up and copy
ENTRIES_PER_SLOT = 16  # bounds a lookup's scan (it runs for every admitted lane)


class Scope:
    """What a lane's keys depend on besides its tokens: its adapter, by identity (one loaded
    again is another adapter; held weakly, so the cache keeps no unloaded adapter alive), and
    the digest of its prompt positions' steering (SteeringSpec.prompt_digest)."""

    def __init__(self, adapter: object | None = None, steering: bytes | None = None) -> None:
        self._adapter = weakref.ref(adapter) if adapter is not None else None
        self.steering = steering

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Scope) or self.steering != other.steering:
            return False
        if self._adapter is None or other._adapter is None:
            return self._adapter is other._adapter
        mine = self._adapter()
        return mine is not None and mine is other._adapter()

    __hash__ = None  # an adapter may die: equality can change, so no hashing


@dataclass(eq=False)
class Entry:
    slot: int
    start: int  # its prompt's keys are positions start..start+len(tokens)-1 of the slot
    tokens: tuple[int, ...]
    used: int  # the clock at its last use
    scope: Scope

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the longest common prefix, by bisection over C-level tuple comparisons."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


class PrefixCache:
    def __init__(self, cache: SlotKVCache, slots: range) -> None:
        self.cache = cache
        self.slots = slots
        self.max_entries = ENTRIES_PER_SLOT * len(slots)
        self.entries: list[Entry] = []
        self._clock = 0
        self.reused_tokens = 0  # served from the cache instead of prefilled (a metric)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def lookup(self, prompt: tuple[int, ...], scope: Scope) -> tuple[Entry, int] | None:
        """The entry of `scope` with the longest common prefix, at least MIN_REUSE tokens and
        short of the whole prompt (its last position must run: its logits are the first
        token's)."""
        best: tuple[Entry, int] | None = None
        head = prompt[:MIN_REUSE]
        for entry in self.entries:
            if entry.tokens[:MIN_REUSE] != head or entry.scope != scope:
                continue
            length = min(common_prefix(entry.tokens, prompt), len(prompt) - 1)
            if length >= MIN_REUSE and (best is None or length > best[1]):
                best = (entry, length)
        return best

    def reuse(self, prompt: tuple[int, ...], slot: int, scope: Scope) -> int:
        """Copy the longest cached prefix of `prompt` in `scope` into `slot`; returns its
        length (0: nothing usable)."""
        found = self.lookup(prompt, scope)
        if found is None:
            return 0
        entry, length = found
        self.cache.copy_span(entry.slot, entry.start, slot, 0, length)
        entry.used = self._tick()
        self.reused_tokens += length
        return length

    def remember(self, prompt: tuple[int, ...], slot: int, scope: Scope) -> None:
        """Keep a freshly prefilled prompt (its keys are in `slot`, positions 0..P-1)."""
        if len(prompt) <= MIN_REUSE:
            return
        alike = [(entry, common_prefix(entry.tokens, prompt)) for entry in self.entries
                 if entry.scope == scope]
        for entry, common in alike:
            if common == len(prompt):
                entry.used = self._tick()  # already covered
                return
        extended = {id(entry) for entry, common in alike if common == len(entry.tokens)}
        self.entries = [entry for entry in self.entries if id(entry) not in extended]
        place = self._place(len(prompt))
        if place is not None:
            self.cache.copy_span(slot, 0, *place, len(prompt))
            self.entries.append(Entry(*place, prompt, self._tick(), scope))

    def _place(self, length: int) -> tuple[int, int] | None:
        """A free span of `length` positions, evicting least recently used entries until
        one is (None: longer than a slot)."""
        while True:
            if len(self.entries) < self.max_entries:
                for slot in self.slots:
                    start = self._gap(slot, length)
                    if start is not None:
                        return slot, start
            if not self.entries:
                return None
            self.entries.remove(min(self.entries, key=lambda e: e.used))

    def _gap(self, slot: int, length: int) -> int | None:
        """The first free span of `length` positions in `slot` (first fit)."""
        end = 0
        for entry in sorted((e for e in self.entries if e.slot == slot), key=lambda e: e.start):
            if entry.start - end >= length:
                return end
            end = entry.end
        return end if self.cache.shape.max_len - end >= length else None
