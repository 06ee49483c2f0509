"""The kvstore's budget arithmetic, eviction order and the budget derived from Redis memory, without Redis or NATS."""

from __future__ import annotations

from services.kvstore.budget import eviction_priority, leading_that_fit, split_bytes
from services.kvstore.derived_budget import (
    FALLBACK_BUDGET_BYTES,
    SOURCE_EXPLICIT,
    SOURCE_FALLBACK,
    SOURCE_MAXMEMORY,
    SOURCE_SYSTEM_MEMORY,
    BudgetChoice,
    DerivedBudget,
    NodeMemory,
    derive_budget,
    node_allowance,
)
from shared.settings import Settings

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


# ---- the budget derived from the Redis nodes' memory (services/kvstore/derived_budget.py) ----

FRACTION, HOST_FRACTION = 0.8, 0.5
GIB = 1024**3


def node(server: str = "a:6379", maxmemory: int = 0, total: int = 0) -> NodeMemory:
    return NodeMemory(server=server, maxmemory=maxmemory, total_system_memory=total)


def test_a_fraction_of_maxmemory_where_it_is_set():
    choice = derive_budget([node(maxmemory=10 * GIB, total=64 * GIB)], FRACTION, HOST_FRACTION)
    assert choice == BudgetChoice(int(10 * GIB * FRACTION), SOURCE_MAXMEMORY)


def test_a_fraction_of_the_host_where_maxmemory_is_unlimited():
    choice = derive_budget([node(maxmemory=0, total=64 * GIB)], FRACTION, HOST_FRACTION)
    assert choice == BudgetChoice(int(64 * GIB * HOST_FRACTION), SOURCE_SYSTEM_MEMORY)


def test_nothing_derived_when_no_node_told_its_memory():
    assert derive_budget([None, None], FRACTION, HOST_FRACTION) is None
    assert derive_budget([node()], FRACTION, HOST_FRACTION) is None  # neither field reported


def test_equal_nodes_add_up_and_the_smallest_bounds_unequal_ones():
    equal = [node("a:1", maxmemory=10 * GIB), node("b:1", maxmemory=10 * GIB)]
    assert derive_budget(equal, FRACTION, HOST_FRACTION).bytes == 2 * int(10 * GIB * FRACTION)
    # Blocks are spread evenly: with 2 and 10 GiB nodes, 2x the small one's allowance, not 12 GiB.
    unequal = [node("a:1", maxmemory=2 * GIB), node("b:1", maxmemory=10 * GIB)]
    assert derive_budget(unequal, FRACTION, HOST_FRACTION).bytes == 2 * int(2 * GIB * FRACTION)


def test_two_databases_of_one_server_share_its_memory():
    same = [node("a:1", maxmemory=10 * GIB), node("a:1", maxmemory=10 * GIB)]
    assert derive_budget(same, FRACTION, HOST_FRACTION).bytes == int(10 * GIB * FRACTION)


def test_a_silent_node_is_taken_to_be_like_the_others_and_mixed_rules_are_named():
    assert derive_budget([node("a:1", maxmemory=10 * GIB), None], FRACTION, HOST_FRACTION).bytes == \
        2 * int(10 * GIB * FRACTION)
    mixed = derive_budget([node("a:1", maxmemory=10 * GIB), node("b:1", total=64 * GIB)], FRACTION, HOST_FRACTION)
    assert mixed.source == f"{SOURCE_MAXMEMORY}+{SOURCE_SYSTEM_MEMORY}"
    assert mixed.bytes == 2 * int(10 * GIB * FRACTION)


def test_node_allowance_prefers_maxmemory():
    assert node_allowance(node(maxmemory=GIB, total=8 * GIB), FRACTION, HOST_FRACTION) == (int(GIB * FRACTION),
                                                                                       SOURCE_MAXMEMORY)


def test_an_explicit_budget_wins_and_the_fallback_holds_until_a_node_answers():
    budget = DerivedBudget()
    assert budget.current(Settings(kv_budget_bytes=None)) == BudgetChoice(FALLBACK_BUDGET_BYTES, SOURCE_FALLBACK)
    assert budget.current(Settings(kv_budget_bytes=123)) == BudgetChoice(123, SOURCE_EXPLICIT)
    budget.derived = BudgetChoice(5 * GIB, SOURCE_MAXMEMORY)
    assert budget.current(Settings(kv_budget_bytes=None)).bytes == 5 * GIB
    assert budget.current(Settings(kv_budget_bytes=0)) == BudgetChoice(0, SOURCE_EXPLICIT)


def test_the_budget_setting_is_optional_and_read_from_the_environment(monkeypatch):
    assert Settings().kv_budget_bytes is None
    monkeypatch.setenv("RINGSERVE_KV_BUDGET_BYTES", str(16 * GIB))
    assert Settings().kv_budget_bytes == 16 * GIB
