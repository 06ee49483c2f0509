"""The kvstore's budget arithmetic and eviction order, without Redis or NATS."""

from __future__ import annotations

from services.kvstore.budget import eviction_priority, leading_that_fit, split_bytes

WEIGHT_S = 60.0


def test_attention_mass_buys_recency():
    # Used at the same moment: the block that drew more attention leaves later.
    assert eviction_priority(1_000.0, 0.0, WEIGHT_S) < eviction_priority(1_000.0, 0.5, WEIGHT_S)
    # One unit of mass is worth `weight_s` seconds of recency.
    assert eviction_priority(1_000.0, 1.0, WEIGHT_S) == eviction_priority(1_000.0 + WEIGHT_S, 0.0, WEIGHT_S)


def test_split_bytes_spreads_the_remainder_over_the_first_blocks():
    assert split_bytes(10, 3) == [4, 3, 3]
    assert sum(split_bytes(1_001, 7)) == 1_001


def test_only_the_leading_blocks_that_fit_are_kept():
    assert leading_that_fit([4, 4, 4], 12) == 3
    assert leading_that_fit([4, 4, 4], 11) == 2
    # A block after one that did not fit is not kept, though it would fit alone: it could never be reached.
    assert leading_that_fit([4, 8, 1], 6) == 1
    assert leading_that_fit([4], -1) == 0
