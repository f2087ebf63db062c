"""Weighted adapters per request: sum_i w_i * s_i * B_i A_i as one virtual adapter.

A request may give one adapter a scale or several resident adapters weights. Their deltas
add up exactly as one adapter whose A stacks the w_i s_i A_i and whose B stacks the B_i (rank
sum r_i, scaling 1: peft's `add_weighted_adapter(..., combination_type="cat")`). It takes one
LoRA slot like any adapter, so the batched forward, the CPU path and the Triton kernels run
it unchanged, rows of one batch differing; no base weight is touched. Mixes are cached by
their parts (the adapter objects, so one unloaded and loaded again makes a new mix).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from steerserve.adapters.lora.files import LoraAdapter

MIX_CACHE = 32  # distinct mixes kept (each holds its stacked weights)


class MixTooLarge(ValueError):
    pass


def mix_adapters(parts: list[tuple[LoraAdapter, float]], max_rank: int) -> LoraAdapter:
    rank = sum(adapter.rank for adapter, _ in parts)
    if rank > max_rank:
        raise MixTooLarge(f"these adapters' ranks add up to {rank}; the server's LoRA slots "
                          f"hold rank {max_rank} (--max-lora-rank)")
    keys = list(dict.fromkeys(key for adapter, _ in parts for key in adapter.weights))
    weights = {}
    for key in keys:
        pairs = [(adapter.weights[key], weight * adapter.scaling)
                 for adapter, weight in parts if key in adapter.weights]
        a = torch.cat([a * factor for (a, _), factor in pairs]).contiguous()  # (R, in)
        b = torch.cat([b for (_, b), _ in pairs], dim=1).contiguous()  # (out, R)
        weights[key] = (a, b)
    name = "+".join(f"{weight:g}*{adapter.name}" for adapter, weight in parts)
    targets = tuple(dict.fromkeys(t for adapter, _ in parts for t in adapter.target_modules))
    return LoraAdapter(name, Path(), rank, float(rank), 1.0, targets, weights)


class MixCache:
    """Thread-safe, least recently used first out."""

    def __init__(self, size: int = MIX_CACHE) -> None:
        self.size = size
        # key -> (the parts' adapters: kept alive, so their ids stay theirs; the mix)
        self._mixes: OrderedDict[tuple, tuple[list[LoraAdapter], LoraAdapter]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, parts: list[tuple[LoraAdapter, float]], max_rank: int) -> LoraAdapter:
        key = tuple((id(adapter), weight) for adapter, weight in parts)
        with self._lock:
            found = self._mixes.get(key)
            if found is not None:
                self._mixes.move_to_end(key)
                return found[1]
        mixed = mix_adapters(parts, max_rank)
        with self._lock:
            self._mixes[key] = ([adapter for adapter, _ in parts], mixed)
            while len(self._mixes) > self.size:
                self._mixes.popitem(last=False)
        return mixed
