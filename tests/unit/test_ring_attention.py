"""Ring attention and the collective decode merge across real processes (gloo on CPU).

One spawn per world size (2 and 4; rings of 1 to 4 members run inside them, as subsets of
the world like a server's requests); each rank runs every check and raises on a mismatch,
which torch.multiprocessing reports with the rank's traceback. The reference is single-process
causal attention over the whole sequence in float64.
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
from shared.attention.ring import ring_attention
from tests.unit.test_attention_local import reference

TOTAL_TOKENS = 37
CHUNK_TOKENS = 5
DIM = 8
RELATIVE_TOLERANCE = 1e-5
DIST_TIMEOUT_S = 60


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
                check_collective_merge(ring)
            dist.barrier()
        if world_size == 4:
            # The same through a process group of exactly the ring's ranks (what NCCL needs).
            subset = [3, 1]
            group = dist.new_group(subset, use_local_synchronization=True)
            if rank in subset:
                check_ring(subset, heads=4, kv_heads=2, group=group)
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
