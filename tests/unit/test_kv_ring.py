"""Consistent hashing of block keys over Redis nodes."""

from __future__ import annotations

from collections import Counter

import pytest

from shared.kv.ring import HashRing

KEYS = [f"ringserve:kv:m:none:{layer}:{i:032x}" for layer in range(4) for i in range(2500)]
# With 160 virtual points per node, each node's share stays within this of a perfect split.
BALANCE_TOLERANCE = 0.1


def test_single_node_holds_everything():
    ring = HashRing(["redis://a/0"])
    assert {ring.node_for(k) for k in KEYS} == {0}


def test_keys_spread_evenly_over_two_nodes():
    ring = HashRing(["redis://a/0", "redis://a/1"])
    shares = Counter(ring.node_for(k) for k in KEYS)
    for node in (0, 1):
        assert abs(shares[node] / len(KEYS) - 0.5) < BALANCE_TOLERANCE


def test_adding_a_node_moves_only_keys_to_it():
    two = HashRing(["redis://a/0", "redis://a/1"])
    three = HashRing(["redis://a/0", "redis://a/1", "redis://a/2"])
    moved = [k for k in KEYS if two.node_for(k) != three.node_for(k)]
    assert all(three.node_for(k) == 2 for k in moved)
    assert abs(len(moved) / len(KEYS) - 1 / 3) < BALANCE_TOLERANCE


def test_placement_follows_node_names_not_list_order():
    ab = HashRing(["redis://a/0", "redis://a/1"])
    ba = HashRing(["redis://a/1", "redis://a/0"])
    assert all(ab.nodes[ab.node_for(k)] == ba.nodes[ba.node_for(k)] for k in KEYS)


def test_needs_a_node():
    with pytest.raises(ValueError):
        HashRing([])
