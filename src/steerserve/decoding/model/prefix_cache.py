"""Prefix cache: the prompts of recently prefilled lanes, kept in KV slots of their own.

A new lane whose prompt starts like one of them (a chat template's system prompt, few-shot
examples, a conversation's earlier turns) copies the keys and values of the common part
and prefills only the rest: a lane's keys at position p depend on tokens 0..p, its LoRA
adapter and the steering of its prompt positions, so any common prefix of two prompts is
valid for two lanes of one `Scope` (vLLM's prefix caching keys its blocks by adapter the same
way). Lanes that score their prompt take no part (they need every position's logits).
Entries are replaced least recently used first.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from steerserve.decoding.model.kv_cache import SlotKVCache

MIN_REUSE = 16  # shorter common prefixes are cheaper to prefill than to look up and copy


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


@dataclass
class Entry:
    slot: int
    tokens: tuple[int, ...]
    used: int  # the clock at its last use
    scope: Scope = field(default_factory=Scope)


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
        self.entries = [Entry(slot, (), 0) for slot in slots]
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
        for entry in self.entries:
            if entry.scope != scope:
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
        self.cache.move_slot(entry.slot, slot, length)
        entry.used = self._tick()
        self.reused_tokens += length
        return length

    def remember(self, prompt: tuple[int, ...], slot: int, scope: Scope) -> None:
        """Keep a freshly prefilled prompt (its keys are in `slot`, positions 0..P-1)."""
        if len(prompt) <= MIN_REUSE:
            return
        for entry in self.entries:
            if entry.scope == scope and common_prefix(entry.tokens, prompt) == len(prompt):
                entry.used = self._tick()  # already covered
                return
        entry = min(self.entries, key=lambda e: e.used)
        self.cache.move_slot(slot, entry.slot, len(prompt))
        entry.tokens, entry.used, entry.scope = prompt, self._tick(), scope
