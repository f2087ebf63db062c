"""A slot-based KV cache: one preallocated row per running lane, kept compact.

Running lanes always occupy slots 0..n-1, so a forward over a contiguous range of lanes reads
the cache as a view (no gather). When a lane leaves, the last lane's rows move into its slot.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    num_slots: int
    num_kv_heads: int
    head_dim: int
    max_len: int


def cache_shape_for(config, num_slots: int, max_len: int) -> CacheShape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return CacheShape(config.num_hidden_layers, num_slots, kv_heads, head_dim, max_len)


def lazy_zeros(dims: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """A zero tensor whose CPU memory is committed only where it is written.

    Attention reads every row up to the batch's longest length, masked; a masked position still
    multiplies its value by a zero weight, so it must hold a finite number (0 * NaN = NaN).
    torch.empty may hand back recycled memory holding NaNs, torch.zeros touches every page of a
    cache sized for all slots at full context; an anonymous mmap is zero and lazily committed.
    """
    if device.type != "cpu":
        return torch.zeros(dims, dtype=dtype, device=device), None
    nbytes = math.prod(dims) * torch.empty((), dtype=dtype).element_size()
    buffer = mmap.mmap(-1, max(nbytes, 1))
    tensor = torch.frombuffer(buffer, dtype=dtype, count=math.prod(dims)).view(dims)
    return tensor, buffer


class SlotKVCache:
    """Per layer, keys and values of shape (slots, kv_heads, max_len, head_dim)."""

    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device) -> None:
        self.shape = shape
        dims = (shape.num_slots, shape.num_kv_heads, shape.max_len, shape.head_dim)
        self._buffers = []  # the mmaps behind CPU tensors must outlive them
        self.keys = [self._allocate(dims, dtype, device) for _ in range(shape.num_layers)]
        self.values = [self._allocate(dims, dtype, device) for _ in range(shape.num_layers)]

    def _allocate(self, dims, dtype, device) -> torch.Tensor:
        tensor, buffer = lazy_zeros(dims, dtype, device)
        self._buffers.append(buffer)
        return tensor

    def for_prefill(self, first_slot: int, num_rows: int, start: int, length: int) -> CacheWindow:
        """Rows first_slot.. write positions start..start+length-1 and read 0..start+length-1."""
        return CacheWindow(self, slice(first_slot, first_slot + num_rows), start, None,
                           start + length)

    def for_decode(self, slots: torch.Tensor, first_slot: int, positions: torch.Tensor,
                   kv_len: int, alone: tuple[tuple[int, int], ...] = ()) -> CacheWindow:
        """Each row (slots: first_slot, first_slot + 1, ...) writes one token at its own
        position; reads 0..kv_len-1 (masked per row), and the rows in `alone` (row, key
        length) each their own length too (model/attention_split.py)."""
        rows = slice(first_slot, first_slot + positions.shape[0])
        return CacheWindow(self, rows, None, positions, kv_len, row_index=slots, alone=alone)

    def for_rows_at(self, first_slot: int, grid: torch.Tensor, kv_len: int) -> CacheWindow:
        """Row r writes its T tokens at positions grid[r] (a prefill after a reused prefix:
        each row starts where its prefix ends); reads 0..kv_len-1 (masked per row)."""
        rows = slice(first_slot, first_slot + grid.shape[0])
        return CacheWindow(self, rows, None, None, kv_len, grid)

    def clear(self, slot: int, length: int) -> None:
        """Zero a slot's first `length` positions when its lane leaves. Attention reads every
        row up to the batch's longest length, masked: a masked position still multiplies its
        value by 0 (0 * NaN = NaN) and adds its score to -inf (inf - inf = NaN), so what a
        lane leaves behind (a steering request can drive its keys past the float range)
        must not reach the next lane in that slot."""
        length = min(length, self.shape.max_len)
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[slot, :, :length].zero_()
            values[slot, :, :length].zero_()

    def move_slot(self, source: int, target: int, length: int) -> None:
        """Copy a slot's first `length` positions to another (compaction on leave)."""
        self.copy_span(source, 0, target, 0, length)

    def copy_span(self, source: int, source_start: int, target: int, target_start: int,
                  length: int) -> None:
        """Copy `length` positions of one slot, from source_start, to another's from
        target_start (prefixes in and out of the prefix cache's slots)."""
        for cached in (*self.keys, *self.values):
            cached[target, :, target_start:target_start + length] = \
                cached[source, :, source_start:source_start + length]


class CacheWindow:
    """What one forward sees: the duck-typed cache object the HF attention layers call."""

    def __init__(self, cache: SlotKVCache, rows: slice, start: int | None,
                 positions: torch.Tensor | None, kv_len: int,
                 grid: torch.Tensor | None = None, row_index: torch.Tensor | None = None,
                 alone: tuple[tuple[int, int], ...] = ()) -> None:
        self.cache = cache
        self.rows = rows
        self.start = start
        self.positions = positions
        self.grid = grid  # (B, T) positions of every written token, when rows start apart
        self.kv_len = kv_len
        self.alone = alone  # (row, key length): decode rows that attend by themselves
        indexed = positions if positions is not None else grid
        if row_index is not None:
            self._row_index = row_index
        elif indexed is not None:
            self._row_index = torch.arange(rows.start, rows.stop, device=indexed.device)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        # key, value: (B, kv_heads, T, head_dim)
        if self.grid is not None:  # indexed as (B, T, kv_heads, head_dim)
            keys[self._row_index.unsqueeze(1), :, self.grid] = key.transpose(1, 2)
            values[self._row_index.unsqueeze(1), :, self.grid] = value.transpose(1, 2)
        elif self.positions is None:
            end = self.start + key.shape[2]
            keys[self.rows, :, self.start:end] = key
            values[self.rows, :, self.start:end] = value
        else:
            keys[self._row_index, :, self.positions] = key[:, :, 0]
            values[self._row_index, :, self.positions] = value[:, :, 0]
        return keys[self.rows, :, : self.kv_len], values[self.rows, :, : self.kv_len]

    def row_alone(self, layer_idx: int, row: int, length: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """One row's keys and values over its own length, (1, kv_heads, length, head_dim)
        views, after `update` has written this step's."""
        slot = self.rows.start + row
        return (self.cache.keys[layer_idx][slot:slot + 1, :, :length],
                self.cache.values[layer_idx][slot:slot + 1, :, :length])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len
