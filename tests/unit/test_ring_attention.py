"""Ring attention and the collective decode merge across real processes (gloo on CPU).

One spawn per world size (2 and 4; rings of 1 to 4 members run inside them, as subsets of
the world like a server's requests); each rank runs every check and raises on a mismatch,
which torch.multiprocessing reports with the rank's traceback. The reference is single-process
causal attention over the whole sequence in float64 (masked by the pattern, for sparse ones).

Sparse patterns (sliding, hybrid, strided) also check the traffic: a member sends exactly the
rows the exchange plan gives it, to the members it names, and a window shorter than a unit
moves a small part of what the full ring moves.
"""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.attention.decode import collective_merge, decode_partial
from shared.attention.layout import segment_tokens, zigzag_segments
from shared.attention.local import attention_with_lse
from shared.attention.merge import merge_partials
from shared.attention.pattern import KeyPattern
from shared.attention.ring import (
    exchange_is_sparse,
    exchange_plan,
    local_rows,
    ring_attention,
    rows_to_send,
    segments_within,
    union_segments,
)
from tests.unit.test_attention_local import reference

TOTAL_TOKENS = 37
CHUNK_TOKENS = 5
DIM = 8
RELATIVE_TOLERANCE = 1e-5
DIST_TIMEOUT_S = 60
# Patterns against the layout's units of CHUNK_TOKENS = 5: windows inside one unit, reaching into
# the next, and past the prompt (nothing to save: the ring runs); sinks; strided keys.
PATTERNS = {
    "sliding_short": KeyPattern(window=3),
    "sliding_long": KeyPattern(window=8),
    "sliding_past_prompt": KeyPattern(window=100),
    "hybrid": KeyPattern(window=3, sinks=2),
    "strided": KeyPattern(window=3, stride=4),
}
# A window shorter than a unit (and 2 sinks, a large part of a 37-token prompt): the sparse
# exchange moves at most this part of the ring's bytes.
SHORT_WINDOW_TRAFFIC_FRACTION = 1 / 3


def rows_of(segments):
    """Global positions of the rows of a member's segments, in row order."""
    return torch.cat([torch.arange(s, e) for s, e in segments])


def relative_error(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def check_ring(ring_ranks, heads, kv_heads, *, q_segments_of=None, group=None):
    """Run ring attention on this rank's share of a fixed random sequence and compare."""
    g = torch.Generator().manual_seed(heads * 100 + kv_heads)
    q = torch.randn(TOTAL_TOKENS, heads, DIM, generator=g)
    k = torch.randn(TOTAL_TOKENS, kv_heads, DIM, generator=g)
    v = torch.randn(TOTAL_TOKENS, kv_heads, DIM, generator=g)
    scale = 1 / math.sqrt(DIM)
    ref_out, ref_lse = reference(q, k, v, scale, causal=True)

    me = ring_ranks.index(dist.get_rank())
    kv_segments = zigzag_segments(TOTAL_TOKENS, CHUNK_TOKENS, len(ring_ranks))
    q_segments = kv_segments[me] if q_segments_of is None else q_segments_of(kv_segments[me])
    kv_rows, q_rows = rows_of(kv_segments[me]), rows_of(q_segments)
    out, lse = ring_attention(
        q[q_rows], k[kv_rows], v[kv_rows], scale=scale, kv_segments=kv_segments,
        ring_ranks=ring_ranks, q_segments=None if q_segments_of is None else q_segments, group=group,
    )
    assert out.shape == (len(q_rows), heads, DIM) and out.dtype == torch.float32
    err_out, err_lse = relative_error(out, ref_out[q_rows]), relative_error(lse, ref_lse[q_rows])
    assert err_out < RELATIVE_TOLERANCE and err_lse < RELATIVE_TOLERANCE, (ring_ranks, heads, kv_heads, err_out, err_lse)


def sees(i: int, j: int, pattern: KeyPattern | None) -> bool:
    """The definition, one (query, key) pair at a time."""
    if j > i:
        return False
    if pattern is None or pattern.is_full:
        return True
    return (j > i - pattern.window or j < pattern.sinks
            or (pattern.stride is not None and j % pattern.stride == 0))


def masked_reference(q, k, v, scale, pattern):
    """float64 attention of every position over the keys it sees -> (out [T, H, d], lse [T, H])."""
    n = q.shape[0]
    keep = torch.tensor([[sees(i, j, pattern) for j in range(n)] for i in range(n)])
    group = q.shape[1] // k.shape[1]
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double().repeat_interleave(group, 1)) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, T]
    out = torch.einsum("hqk,khd->qhd", torch.exp(scores - lse.unsqueeze(-1)), v.double().repeat_interleave(group, 1))
    return out, lse.transpose(0, 1)


def ring_bytes(kv_segments, me, row_bytes):
    """What the ring sends from member me: every block but the one of the member after it."""
    size = len(kv_segments)
    return row_bytes * sum(segment_tokens(kv_segments[(me - s) % size]) for s in range(size - 1))


def check_sparse_ring(ring_ranks, pattern, *, q_segments_of=None, group=None):
    """Ring attention with a pattern equals the dense masked reference, and sends what the plan says."""
    heads, kv_heads = 4, 2
    g = torch.Generator().manual_seed(11)
    q = torch.randn(TOTAL_TOKENS, heads, DIM, generator=g)
    k = torch.randn(TOTAL_TOKENS, kv_heads, DIM, generator=g)
    v = torch.randn(TOTAL_TOKENS, kv_heads, DIM, generator=g)
    scale = 1 / math.sqrt(DIM)
    ref_out, ref_lse = masked_reference(q, k, v, scale, pattern)

    size = len(ring_ranks)
    me = ring_ranks.index(dist.get_rank())
    kv_segments = zigzag_segments(TOTAL_TOKENS, CHUNK_TOKENS, size)
    q_segments = kv_segments[me] if q_segments_of is None else q_segments_of(kv_segments[me])
    kv_rows, q_rows = rows_of(kv_segments[me]), rows_of(q_segments)
    steps = []
    out, lse = ring_attention(
        q[q_rows], k[kv_rows], v[kv_rows], scale=scale, kv_segments=kv_segments, ring_ranks=ring_ranks,
        q_segments=q_segments, group=group, on_step=steps.append, pattern=pattern,
    )
    label = (ring_ranks, pattern, q_segments_of is not None)
    err_out, err_lse = relative_error(out, ref_out[q_rows]), relative_error(lse, ref_lse[q_rows])
    assert err_out < RELATIVE_TOLERANCE and err_lse < RELATIVE_TOLERANCE, (label, err_out, err_lse)

    row_bytes = 2 * kv_heads * DIM * k.element_size()  # a K row and a V row
    sent = sum(s.bytes_sent for s in steps)
    full_ring = ring_bytes(kv_segments, me, row_bytes)
    plan = exchange_plan(kv_segments, kv_segments, pattern)
    if size > 1 and exchange_is_sparse(plan, kv_segments):
        assert len(steps) == 1, label  # one direct exchange
        assert sent == row_bytes * sum(segment_tokens(rows) for rows in plan[me]), label
        assert steps[0].peers == sum(1 for rows in plan[me] if rows), label
    else:
        assert len(steps) == size and sent == full_ring, label
    if size > 1 and pattern.window < CHUNK_TOKENS and pattern.stride is None:
        total_direct = row_bytes * sum(segment_tokens(rows) for sends in plan for rows in sends)
        total_ring = row_bytes * (size - 1) * TOTAL_TOKENS
        assert total_direct <= SHORT_WINDOW_TRAFFIC_FRACTION * total_ring, (label, total_direct, total_ring)
    # Blocks skipped as the ring counts them: causality, and what the pattern empties.
    assert sum(s.blocks for s in steps) == len(q_segments) * sum(len(m) for m in kv_segments), label
    if pattern.window < CHUNK_TOKENS and size > 1:
        assert sum(s.blocks_skipped for s in steps) > 0, label


def check_collective_merge(ring_ranks, group=None):
    """Sharded decode: the merged partials equal attention over the whole cache, on every member."""
    n_cache, heads, kv_heads = 29, 4, 2
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, heads, DIM, generator=g)
    k = torch.randn(n_cache, kv_heads, DIM, generator=g)
    v = torch.randn(n_cache, kv_heads, DIM, generator=g)
    me = ring_ranks.index(dist.get_rank())
    shard = torch.tensor_split(torch.arange(n_cache), len(ring_ranks))[me]  # uneven shards
    out, lse = decode_partial(q, k[shard], v[shard], 0.3)
    merged_out, merged_lse = collective_merge(out, lse, ring_ranks, group)
    ref_out, ref_lse = reference(q, k, v, 0.3)
    assert relative_error(merged_out, ref_out) < RELATIVE_TOLERANCE
    assert relative_error(merged_lse, ref_lse) < RELATIVE_TOLERANCE
    # Bit-identical on every member: each one equals the merge of all partials in ring order.
    partials = [decode_partial(q, k[s], v[s], 0.3) for s in torch.tensor_split(torch.arange(n_cache), len(ring_ranks))]
    in_order = merge_partials([p[0] for p in partials], [p[1] for p in partials])
    assert torch.equal(merged_out, in_order[0]) and torch.equal(merged_lse, in_order[1])


def cached_prefix(segments):
    """Queries only for the tokens after the first 3 of the member's first segment."""
    (start, end), *rest = segments
    return [(start + 3, end), *rest] if end - start > 3 else rest


# Rings checked in each world: ring sizes 1..world, rank order and not, subsets of the world.
RINGS = {
    2: [[0, 1], [1, 0], [1]],
    4: [[0, 1, 2, 3], [2, 0, 3, 1], [0, 1, 2], [3, 1], [2]],
}


def run_rank(rank, world_size, store_path):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=DIST_TIMEOUT_S)
    )
    try:
        for ring in RINGS[world_size]:
            # Ranks outside the ring take no part: they are busy elsewhere in a real server.
            if rank in ring:
                check_ring(ring, heads=4, kv_heads=2)  # GQA
                check_ring(ring, heads=4, kv_heads=1)  # MQA
                check_ring(ring, heads=3, kv_heads=3, q_segments_of=cached_prefix)
                for pattern in PATTERNS.values():
                    check_sparse_ring(ring, pattern)
                check_sparse_ring(ring, PATTERNS["hybrid"], q_segments_of=cached_prefix)
                check_collective_merge(ring)
            dist.barrier()
        if world_size == 4:
            # The same through a process group of exactly the ring's ranks (what NCCL needs).
            subset = [3, 1]
            group = dist.new_group(subset, use_local_synchronization=True)
            if rank in subset:
                check_ring(subset, heads=4, kv_heads=2, group=group)
                check_sparse_ring(subset, PATTERNS["hybrid"], group=group)
                check_collective_merge(subset, group)
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", sorted(RINGS))
def test_ring_attention_matches_full_causal_attention(world_size, tmp_path):
    mp.spawn(run_rank, args=(world_size, str(tmp_path / "store")), nprocs=world_size, join=True)


def test_ring_of_one_needs_no_communication():
    assert not dist.is_initialized()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(TOTAL_TOKENS, 2, DIM, generator=g) for _ in range(3))
    segments = [[(0, TOTAL_TOKENS)]]
    out, lse = ring_attention(q, k, v, scale=0.3, kv_segments=segments, ring_ranks=[0])
    ref_out, ref_lse = reference(q, k, v, 0.3, causal=True)
    assert relative_error(out, ref_out) < RELATIVE_TOLERANCE
    assert relative_error(lse, ref_lse) < RELATIVE_TOLERANCE
    # Queries for a suffix only (the prefix's KV already cached).
    out, _ = ring_attention(q[30:], k, v, scale=0.3, kv_segments=segments, ring_ranks=[0], q_segments=[(30, 37)])
    assert relative_error(out, ref_out[30:]) < RELATIVE_TOLERANCE
    assert segment_tokens(segments[0]) == TOTAL_TOKENS
    assert torch.allclose(out, attention_with_lse(q[30:], k, v, 0.3, causal=True, q_start=30)[0])


# ---- the exchange plan, pure -------------------------------------------------------------------


def positions(segments):
    return {j for lo, hi in segments for j in range(lo, hi)}


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("ring_size", [2, 3, 4])
def test_rows_to_send_holds_every_key_the_receiver_sees(name, ring_size):
    """Against the definition, pair by pair: every key of the sender a receiver's query sees is
    sent; without strided keys nothing else is (with them, only rows between two seen ones)."""
    pattern = PATTERNS[name]
    kv_segments = zigzag_segments(TOTAL_TOKENS, CHUNK_TOKENS, ring_size)
    for sender in kv_segments:
        for receiver in kv_segments:
            sent = rows_to_send(sender, receiver, pattern)
            assert all(a_hi < b_lo for (_, a_hi), (b_lo, _) in zip(sent, sent[1:]))  # disjoint, ascending, apart
            assert segments_within(sent, sender)
            seen = {j for j in positions(sender) if any(sees(i, j, pattern) for i in positions(receiver))}
            assert seen <= positions(sent), (name, sender, receiver)
            if pattern.stride is None:
                assert positions(sent) == seen, (name, sender, receiver)
            else:  # a covering range: each sent range starts and ends on a key seen
                assert all(lo in seen and hi - 1 in seen for lo, hi in sent), (name, sender, receiver)


def test_rows_to_send_for_a_short_window_and_sinks():
    # Member 1 of a 2-ring over 37 tokens in units of 5 holds [5, 15) and [25, 35).
    sender, receiver = [(0, 5), (15, 25), (35, 37)], [(5, 15), (25, 35)]
    assert rows_to_send(sender, receiver, KeyPattern(window=3)) == [(3, 5), (23, 25)]
    assert rows_to_send(sender, receiver, KeyPattern(window=3, sinks=2)) == [(0, 2), (3, 5), (23, 25)]
    assert rows_to_send(sender, receiver, KeyPattern(window=8)) == [(0, 5), (18, 25)]
    # every 4th key: 0, 4 | 16, 20, 24 -> one covering range per segment, the window's rows inside
    assert rows_to_send(sender, receiver, KeyPattern(window=3, stride=4)) == [(0, 5), (16, 25)]
    assert rows_to_send(sender, receiver, None) == [(0, 5), (15, 25)]  # causal: not 35, 36
    assert rows_to_send(sender, [], KeyPattern(window=3)) == []
    assert rows_to_send([(30, 37)], [(0, 10)], KeyPattern(window=3, sinks=2)) == []  # all after the queries


def test_exchange_plan_is_sparse_for_a_short_window_only():
    kv_segments = zigzag_segments(TOTAL_TOKENS, CHUNK_TOKENS, 4)
    plan = exchange_plan(kv_segments, kv_segments, KeyPattern(window=3))
    assert all(plan[a][a] == [] for a in range(4))
    assert exchange_is_sparse(plan, kv_segments)
    # Member 0 holds units 0 and 7: only unit 1's queries (member 1) reach back into it.
    assert [bool(rows) for rows in plan[0]] == [False, True, False, False]
    # A window longer than a unit (8 > 5) still reaches only the unit or two before each one.
    assert exchange_is_sparse(exchange_plan(kv_segments, kv_segments, KeyPattern(window=8)), kv_segments)
    for wide in (KeyPattern(window=100), KeyPattern(window=3, stride=4)):  # nearly everything seen: the ring
        assert not exchange_is_sparse(exchange_plan(kv_segments, kv_segments, wide), kv_segments), wide


def test_local_rows_maps_positions_to_rows():
    segments = [(0, 5), (15, 25), (35, 37)]
    assert local_rows(segments, [(3, 5), (23, 25), (35, 36)]) == [(3, 5), (13, 15), (15, 16)]


def test_union_and_containment_of_segments():
    assert union_segments([(5, 9), (0, 3), (2, 4), (9, 9), (9, 12)]) == [(0, 4), (5, 12)]
    assert segments_within([(3, 5), (23, 25)], [(0, 5), (15, 25)])
    assert segments_within([(3, 6)], [(0, 5), (5, 8)])  # touching segments cover across their seam
    assert not segments_within([(3, 16)], [(0, 5), (15, 25)])
