"""Sequence-parallel decode: each member attends the new tokens over its shard of the KV cache,
then the partials are merged (by the fusion service over the bus, or here among the members).

A decode token sees every cached key: its owner appends the token's own K/V to its shard
before calling decode_partial, so no mask is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from shared.attention.local import attention_with_lse
from shared.attention.merge import merge_partials
from shared.attention.ring import member_index


def decode_partial(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [t, H, d] (t new tokens, usually 1) over this shard's k/v_cache [n, KVH, d] -> (out, lse)."""
    return attention_with_lse(q, k_cache, v_cache, scale)


def collective_merge(
    out: torch.Tensor,
    lse: torch.Tensor,
    ring_ranks: Sequence[int],
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exchange partials among the ring's members and merge them: the `collective` fusion.

    out: [t, H, d], lse: [t, H]. Every member sends its partial to every other one by
    point-to-point and merges all of them in ring order with merge_partials, so every member
    ends with bit-identical results. ring_ranks and group as in ring_attention.
    """
    me = member_index(ring_ranks)
    # One float32 buffer per partial: [t, H, d + 1], lse in the last column.
    mine = torch.cat((out.float(), lse.float().unsqueeze(-1)), dim=-1).contiguous()
    packed = [mine if m == me else torch.empty_like(mine) for m in range(len(ring_ranks))]
    ops = []
    for m, rank in enumerate(ring_ranks):
        if m != me:
            ops.append(dist.P2POp(dist.isend, mine, rank, group))
            ops.append(dist.P2POp(dist.irecv, packed[m], rank, group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return merge_partials([p[..., :-1] for p in packed], [p[..., -1] for p in packed])
