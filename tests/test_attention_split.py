"""Which decode rows attend alone: the fewest keys read, against every choice tried."""

from __future__ import annotations

import itertools
import random

from steerserve.decoding.model.attention_split import (
    ALONE_COST,
    MAX_ALONE,
    split_attention,
)


def keys_read(lengths: list[int], alone: set[int]) -> int:
    shared = max(length for row, length in enumerate(lengths) if row not in alone)
    return len(lengths) * shared + sum(lengths[row] + ALONE_COST for row in alone)


def test_the_split_reads_the_fewest_keys_of_every_choice():
    rng = random.Random(0)
    for _ in range(200):
        batch = rng.randint(1, 10)
        lengths = [rng.choice([rng.randint(1, 60), rng.randint(1, 3000)]) for _ in range(batch)]
        split = split_attention(lengths)
        alone = {row for row, _ in split.alone}
        assert all(lengths[row] == length for row, length in split.alone)
        assert split.shared_len == max(lengths[row] for row in range(batch) if row not in alone)
        best = min(keys_read(lengths, set(chosen)) for size in range(min(MAX_ALONE, batch - 1) + 1)
                   for chosen in itertools.combinations(range(batch), size))
        assert keys_read(lengths, alone) == best == split.keys


def test_one_long_row_among_short_ones_attends_alone():
    lengths = [40] * 63 + [2000]
    lengths[5] = 2000
    split = split_attention(lengths)
    assert split.alone == ((5, 2000), (63, 2000)) and split.shared_len == 40


def test_even_lengths_and_single_rows_share_one_window():
    assert split_attention([100, 98, 101, 99]).alone == ()
    single = split_attention([3000])
    assert single.alone == () and single.shared_len == 3000


def test_no_more_rows_alone_than_the_bound_whatever_the_batch_sends():
    split = split_attention([4000] * 20 + [10] * 44)
    assert split.alone == () and split.shared_len == 4000
    split = split_attention([4000] * MAX_ALONE + [3000] * 2 + [10] * 54)
    assert len(split.alone) == MAX_ALONE and split.shared_len == 3000
