"""Prefix cache: the prompts of recently prefilled lanes, kept in KV slots of their own.

A new lane whose prompt starts like one of them (a chat template's system prompt, few-shot
examples, a conversation's earlier turns) copies the keys and values of the common part
and prefills only the rest: a lane's keys at position p depend on tokens 0..p only, so any
common prefix of two prompts is valid for both. Only lanes whose keys depend on nothing but
their tokens take part: no LoRA adapter, no steering, no prompt scoring (which needs the
logits of every prompt position). Entries are replaced least recently used first.
"""

from __future__ import annotations

from dataclasses import dataclass

from steerserve.decoding.model.kv_cache import SlotKVCache

MIN_REUSE = 16  # shorter common prefixes are cheaper to prefill than to look up and copy


@dataclass
class Entry:
    slot: int
    tokens: tuple[int, ...]
    used: int  # the clock at its last use


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

    def lookup(self, prompt: tuple[int, ...]) -> tuple[Entry, int] | None:
        """The entry with the longest common prefix, at least MIN_REUSE tokens and short of
        the whole prompt (its last position must run: its logits are the first token's)."""
        best: tuple[Entry, int] | None = None
        for entry in self.entries:
            length = min(common_prefix(entry.tokens, prompt), len(prompt) - 1)
            if length >= MIN_REUSE and (best is None or length > best[1]):
                best = (entry, length)
        return best

    def reuse(self, prompt: tuple[int, ...], slot: int) -> int:
        """Copy the longest cached prefix of `prompt` into `slot`; returns its length (0:
        nothing usable)."""
        found = self.lookup(prompt)
        if found is None:
            return 0
        entry, length = found
        self.cache.move_slot(entry.slot, slot, length)
        entry.used = self._tick()
        self.reused_tokens += length
        return length

    def remember(self, prompt: tuple[int, ...], slot: int) -> None:
        """Keep a freshly prefilled prompt (its keys are in `slot`, positions 0..P-1)."""
        if len(prompt) <= MIN_REUSE:
            return
        for entry in self.entries:
            if common_prefix(entry.tokens, prompt) == len(prompt):  # already covered
                entry.used = self._tick()
                return
        entry = min(self.entries, key=lambda e: e.used)
        self.cache.move_slot(slot, entry.slot, len(prompt))
        entry.tokens, entry.used = prompt, self._tick()
