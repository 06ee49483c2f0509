"""Placement math: chunks, zigzag, ring size (the chunk size policy is tested with placement)."""

from __future__ import annotations

import pytest

from shared.attention.layout import (
    merge_adjacent,
    placement_unit_tokens,
    ring_size_for,
    segment_tokens,
    split_chunks,
    zigzag_assign,
    zigzag_segments,
)


def test_split_chunks_last_one_shorter():
    assert split_chunks(37, 5) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25), (25, 30), (30, 35), (35, 37)]
    assert split_chunks(10, 5) == [(0, 5), (5, 10)]
    assert split_chunks(3, 5) == [(0, 3)]
    assert split_chunks(0, 5) == []


def test_zigzag_pairs_early_and_late_chunks():
    assert zigzag_assign(8, 4) == [[0, 7], [1, 6], [2, 5], [3, 4]]
    # Repeats over groups of 2N; a partial last group continues the same pattern.
    assert zigzag_assign(10, 2) == [[0, 3, 4, 7, 8], [1, 2, 5, 6, 9]]
    assert zigzag_assign(3, 3) == [[0], [1], [2]]
    assert zigzag_assign(5, 1) == [[0, 1, 2, 3, 4]]
    with pytest.raises(ValueError):
        zigzag_assign(2, 3)


def causal_work(segments):
    """Keys a causal query block attends: sum over held positions p of (p + 1)."""
    return sum((start + 1 + end) * (end - start) // 2 for start, end in segments)


@pytest.mark.parametrize("ring_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("total,chunk", [(37, 5), (1000, 7), (4096, 64), (100, 1), (2 * 8 * 16, 16)])
def test_zigzag_segments_cover_every_position_once_and_balance_work(ring_size, total, chunk):
    members = zigzag_segments(total, chunk, ring_size)
    assert len(members) == ring_size
    held = sorted(p for segs in members for start, end in segs for p in range(start, end))
    assert held == list(range(total))
    for segs in members:
        assert segs == sorted(segs) and merge_adjacent(segs) == segs
    work = [causal_work(segs) for segs in members]
    n_chunks = len(split_chunks(total, chunk))
    # Whole groups of 2N equal chunks balance exactly; the leftover chunks (fewer than 2N,
    # one per member at most twice) unbalance by at most two of the largest chunks' work.
    largest_chunk_work = causal_work([(total - chunk, total)])
    assert max(work) - min(work) <= 2 * largest_chunk_work
    if total % (2 * ring_size * chunk) == 0:
        assert max(work) == min(work)
    # Relative imbalance falls like 2N / n_chunks.
    if n_chunks >= 40 * ring_size:
        assert max(work) / min(work) < 1.1


def test_zigzag_segments_merge_adjacent_chunks():
    # Member 1 of 2 holds chunks 1 and 2: one segment.
    assert zigzag_segments(20, 5, 2) == [[(0, 5), (15, 20)], [(5, 15)]]
    assert segment_tokens([(0, 5), (15, 20)]) == 10


def test_ring_size_for():
    assert ring_size_for(100, 10, free_workers=4, max_ring=0) == 4
    assert ring_size_for(100, 10, free_workers=4, max_ring=2) == 2
    assert ring_size_for(25, 10, free_workers=8, max_ring=0) == 3  # only 3 chunks
    assert ring_size_for(100, 10, free_workers=0, max_ring=0) == 0
    assert ring_size_for(100, 10, free_workers=3, max_ring=16) == 3


def test_placement_units_come_in_whole_groups_of_2n_no_larger_than_the_chunk():
    # 8 chunks of 16K over 8 members: 16 units of 8K, block-aligned already
    assert placement_unit_tokens(128 * 1024, 16 * 1024, 8, 256) == 8192
    # 5 chunks of 7 over 2, 3, 4 members: 8, 6, 8 units
    assert [placement_unit_tokens(30, 7, n) for n in (2, 3, 4)] == [4, 5, 4]
    # enough chunks already: 2N * ceil(n_chunks / 2N) units; never above the chunk
    assert placement_unit_tokens(100, 10, 2) == 9  # 10 chunks -> 12 units
    assert placement_unit_tokens(80, 10, 2) == 10  # 8 chunks = 2 groups of 4: the chunk itself
    # a ring of one keeps the policy chunk (one segment, nothing to balance)
    assert placement_unit_tokens(6, 7, 1) == 7 and placement_unit_tokens(100, 7, 1, 7) == 7


def test_placement_units_round_up_to_blocks_only_when_the_chunk_is_a_block_multiple():
    assert placement_unit_tokens(131_073, 16_384, 8, 256) == 8448  # 8193 rounded up
    assert placement_unit_tokens(131_073, 16_000, 8, 256) == 8193  # chunk not a multiple: unrounded
    assert placement_unit_tokens(70, 32, 3, 16) == 16  # 12 rounded up; 5 units still cover 3 members
    assert placement_unit_tokens(42, 16, 2, 16) == 16  # 11 rounded up to the chunk: 3 units, not 4
    # rounding would leave fewer units than members (more members than chunks): unrounded
    assert placement_unit_tokens(40, 32, 3, 32) == 7
    with pytest.raises(ValueError):
        placement_unit_tokens(2, 7, 3)
    with pytest.raises(ValueError):
        placement_unit_tokens(0, 7, 1)
