import pytest
import torch

from services.fusion.table import FusionError, FusionTable
from shared.attention.merge import merge_partials
from shared.messages import FusionRequest, PartialItem


def _item(rid, layer, member, parts, seed, step=0):
    g = torch.Generator().manual_seed(seed)
    return PartialItem(request_id=rid, step=step, layer=layer, member=member, parts=parts,
                       out=torch.randn(1, 4, 8, generator=g), lse=torch.randn(1, 4, generator=g))


def test_single_member_is_the_degenerate_merge():
    table = FusionTable(timeout_s=5)
    item = _item("a", 0, 0, 1, seed=1)
    replies = table.add(FusionRequest(worker_id="w", items=[item]), "inbox-1", now=0)
    assert [t for t, _ in replies] == ["inbox-1"]
    merged = replies[0][1].items[0]
    assert torch.allclose(merged.out, item.out) and torch.allclose(merged.lse, item.lse)
    assert table.pending_groups == 0


def test_batched_messages_are_answered_when_all_their_groups_merge():
    table = FusionTable(timeout_s=5)
    a0, a1 = _item("a", 3, 0, 2, 1), _item("a", 3, 1, 2, 2)
    b0 = _item("b", 3, 0, 1, 3)
    # worker 0 batches requests a and b; worker 1 only has a
    assert table.add(FusionRequest(worker_id="w0", items=[a0, b0]), "w0", now=0) == []
    replies = dict(table.add(FusionRequest(worker_id="w1", items=[a1]), "w1", now=0))
    assert set(replies) == {"w0", "w1"}
    expected, _ = merge_partials([a0.out, a1.out], [a0.lse, a1.lse])
    assert [i.request_id for i in replies["w0"].items] == ["a", "b"]
    assert torch.equal(replies["w0"].items[0].out, replies["w1"].items[0].out)  # identical for every member
    assert torch.allclose(replies["w0"].items[0].out, expected)
    assert table.pending_groups == 0


def test_bad_messages_change_nothing_and_missing_parts_time_out():
    table = FusionTable(timeout_s=1)
    a0 = _item("a", 0, 0, 2, 1)
    table.add(FusionRequest(worker_id="w0", items=[a0]), "w0", now=0)
    with pytest.raises(FusionError):
        table.add(FusionRequest(worker_id="w0", items=[_item("a", 0, 0, 2, 5)]), "dup", now=0)
    with pytest.raises(FusionError):
        table.add(FusionRequest(worker_id="w9", items=[_item("a", 0, 1, 3, 5)]), "parts", now=0)
    with pytest.raises(FusionError):
        table.add(FusionRequest(worker_id="w9", items=[_item("c", 0, 4, 2, 5)]), "range", now=0)
    assert table.expire(now=0.5) == []
    expired = table.expire(now=2)
    assert [t for t, _ in expired] == ["w0"] and expired[0][1].error
    assert table.pending_groups == 0


def test_dropping_a_request_answers_its_waiters_at_once_and_spares_others():
    table = FusionTable(timeout_s=60)
    table.add(FusionRequest(worker_id="w0", items=[_item("dead", 0, 0, 2, 1)]), "w0-dead", now=0)
    table.add(FusionRequest(worker_id="w2", items=[_item("live", 0, 0, 2, 2)]), "w2-live", now=0)
    replies = table.drop_request("dead")
    assert [t for t, _ in replies] == ["w0-dead"] and "dropped" in replies[0][1].error
    done = table.add(FusionRequest(worker_id="w3", items=[_item("live", 0, 1, 2, 3)]), "w3-live", now=0)
    assert {t for t, _ in done} == {"w2-live", "w3-live"}


def test_partition_users_follow_worker_heartbeats():
    from services.fusion.table import PartitionUsers

    users = PartitionUsers(timeout_s=2.0)
    users.on_heartbeat("w1", ["p1"], now=0.0)
    users.on_heartbeat("w2", ["p1", "p2"], now=0.0)
    assert users.using("p1", now=1.0) == ["w1", "w2"] and users.using("p3", now=1.0) == []
    users.on_heartbeat("w1", [], now=1.5)  # its request ended
    assert users.using("p1", now=1.5) == ["w2"]
    assert users.using("p1", now=2.5) == []  # w2 went silent: gone, not a user
