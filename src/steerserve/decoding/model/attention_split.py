"""Which rows of a decode batch attend alone, over their own length.

Batched decode attention reads every row's cache up to one shared key length, masked: with one
2,000-token conversation among 63 short ones, every row reads 2,000 positions, and on a CPU
that is most of the step (30 layers of 64 rows x 2,000 keys: about 0.9 s against 45 ms at 100
keys, docs/benchmarks.md). So the batch reads together up to the length that leaves the
fewest keys to read, and its few longer rows each attend alone, over their own length, as if
decoded by themselves. How many may (MAX_ALONE) is fixed, so a step's work never grows with
what requests send, and a row alone costs a few more small ops a layer (ALONE_COST, in keys).
The compiled decode graph reads one window; a batch whose split saves enough leaves it
(model/compiled.py).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_ALONE = 8  # rows a decode step may run apart, at most
ALONE_COST = 256  # a row alone's extra ops a layer, as the keys one row reads in that time


@dataclass(frozen=True)
class AttentionSplit:
    shared_len: int  # keys every row reads in the batched attention
    alone: tuple[tuple[int, int], ...] = ()  # (row, its key length) attending by itself
    keys: int = 0  # what it reads: rows x shared_len, plus each row alone's length + ALONE_COST
    saved: int = 0  # keys fewer than one window over the longest row reads for every row


def split_attention(key_lengths: list[int], most: int = MAX_ALONE) -> AttentionSplit:
    """The split that reads the fewest keys with at most `most` rows alone, counting
    ALONE_COST for each: rows are taken alone longest first, while that lowers the batch's
    shared length enough."""
    batch = len(key_lengths)
    order = sorted(range(batch), key=key_lengths.__getitem__, reverse=True)
    best_alone, best_cost, alone_cost = 0, batch * key_lengths[order[0]], 0
    for count in range(1, min(most, batch - 1) + 1):
        alone_cost += key_lengths[order[count - 1]] + ALONE_COST
        cost = batch * key_lengths[order[count]] + alone_cost
        if cost < best_cost:
            best_alone, best_cost = count, cost
    alone = tuple((row, key_lengths[row]) for row in sorted(order[:best_alone]))
    return AttentionSplit(key_lengths[order[best_alone]], alone, best_cost,
                          batch * key_lengths[order[0]] - best_cost)
