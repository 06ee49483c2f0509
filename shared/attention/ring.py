"""Ring attention: exact causal attention over a sequence spread over the members of a ring.

Member m holds the k/v rows of its segments kv_segments[m] (global positions, rows in segment
order) and the q rows of its query segments. K/V blocks travel around the ring: at step s
every member computes on the block that started at member (m - s) mod N while it passes that
block on to m + 1 and receives the next one from m - 1 (double buffering: the transfer of the
next block is posted before computing on the current one and waited for after). After N steps
every member has seen every block and holds the exact attention of its queries.

Which (query segment, key segment) pairs count follows from positions alone: keys entirely
after the queries are skipped, keys entirely before are attended in full, overlapping ones
causally. So queries for only part of a member's tokens (prefix caching) need nothing special.

ring_ranks are world ranks, in ring order. Only point-to-point operations between ring members
are used: other ranks may be busy with other requests. With NCCL the group's communicator
must exist before a subset of its ranks uses it (a group's first batch_isend_irecv must
otherwise involve all of its ranks): make the world with `device_id` (eager init), as the
worker does, or pass `group`, a process group of exactly the ring's ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shared.attention.layout import Segment, segment_tokens
from shared.attention.local import attention_with_lse, empty_partial
from shared.attention.merge import merge_partials
from shared.attention.pattern import BlockCover, KeyPattern


@dataclass(frozen=True)
class RingStep:
    step: int
    bytes_sent: int  # K/V bytes this member sent on this step (0 on the last)
    wait_ms: float  # host time blocked on the transfer after the step's compute
    blocks: int = 0  # (query segment, key segment) pairs of the step
    blocks_skipped: int = 0  # of those, the ones not computed: keys all after the queries, or masked out


def member_index(ring_ranks: Sequence[int]) -> int:
    """This process's place in the ring (0 without torch.distributed on a ring of one)."""
    if len(ring_ranks) == 1 and not dist.is_initialized():
        return 0
    rank = dist.get_rank()
    if rank not in ring_ranks:
        raise ValueError(f"rank {rank} is not in the ring {list(ring_ranks)}")
    return list(ring_ranks).index(rank)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    kv_segments: Sequence[Sequence[Segment]],
    ring_ranks: Sequence[int],
    q_segments: Sequence[Segment] | None = None,
    group: dist.ProcessGroup | None = None,
    on_step: Callable[[RingStep], None] | None = None,
    pattern: KeyPattern | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of this member's q [tq, H, d] over the ring's keys (with `pattern`, only
    the keys it keeps: a sliding window, plus sinks or strided keys; pattern.py).

    k, v: [tk, KVH, d], this member's rows of kv_segments[me].
    q_segments: positions of q's rows (default: kv_segments[me]).
    on_step: called after each ring step with what it sent, how long the host waited for the
    transfer after computing and how many (query segment, key segment) blocks it skipped
    (tracing and the ring-latency metric use it).
    Returns (out [tq, H, d], lse [tq, H]) in float32.
    """
    ring_size = len(ring_ranks)
    if len(kv_segments) != ring_size:
        raise ValueError("kv_segments needs one list of segments per ring member")
    me = member_index(ring_ranks)
    q_segments = list(kv_segments[me] if q_segments is None else q_segments)
    if q.shape[0] != segment_tokens(q_segments) or k.shape[0] != segment_tokens(kv_segments[me]):
        raise ValueError("q and k rows must match the tokens of q_segments and kv_segments[me]")
    _, heads, dim = q.shape
    kv_heads = k.shape[1]
    next_rank = ring_ranks[(me + 1) % ring_size]
    prev_rank = ring_ranks[(me - 1) % ring_size]

    acc_out, acc_lse = empty_partial(q.shape[0], heads, dim, q.device)
    block = torch.stack((k, v))  # [2, tk, KVH, d]: K and V travel as one buffer
    for step in range(ring_size):
        source = (me - step) % ring_size
        transfer = None
        if step < ring_size - 1:
            incoming = (me - step - 1) % ring_size
            # The block leaving now is the one arriving at the next member: both know its size,
            # so an empty block is skipped on both sides.
            incoming_rows = segment_tokens(kv_segments[incoming])
            next_block = torch.empty((2, incoming_rows, kv_heads, dim), dtype=k.dtype, device=k.device)
            ops = []
            if block.shape[1] > 0:
                ops.append(dist.P2POp(dist.isend, block, next_rank, group))
            if incoming_rows > 0:
                ops.append(dist.P2POp(dist.irecv, next_block, prev_rank, group))
            transfer = dist.batch_isend_irecv(ops) if ops else []
        acc_out, acc_lse, skipped, blocks = _fold_block(
            acc_out, acc_lse, q, q_segments, block[0], block[1], kv_segments[source], scale, pattern
        )
        wait_ms = 0.0
        sent = 0
        if transfer is not None:
            t0 = time.perf_counter()
            for work in transfer:
                work.wait()
            wait_ms = (time.perf_counter() - t0) * 1000
            sent = block.numel() * block.element_size()
            block = next_block
        if on_step is not None:
            on_step(RingStep(step=step, bytes_sent=sent, wait_ms=wait_ms, blocks=blocks, blocks_skipped=skipped))
    return acc_out, acc_lse


def ring_any(flag: bool, group: dist.ProcessGroup, device: torch.device | str = "cpu") -> bool:
    """Whether `flag` is set on any member of `group`: one all_reduce(MAX) of a one-element tensor.

    Every member of the group must call it at the same point of its work (a collective); it is
    how a ring agrees to stop together (prefill abort at a layer boundary) instead of leaving the
    members that did not see the flag blocked in a transfer. `group` is a process group of
    exactly the ring's ranks (other world ranks may be busy elsewhere), registered with c10d or
    not: the backend's own allreduce is called. `device` is where the backend reduces (CPU for
    gloo, as the worker's agreement group is on every backend)."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    group.allreduce([value], opts).wait()
    return bool(value.item())


def _fold_block(
    acc_out: torch.Tensor,
    acc_lse: torch.Tensor,
    q: torch.Tensor,
    q_segments: Sequence[Segment],
    k: torch.Tensor,
    v: torch.Tensor,
    kv_segments: Sequence[Segment],
    scale: float,
    pattern: KeyPattern | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Merge the attention of every query segment over one block's key segments into acc
    -> (acc_out, acc_lse, pairs skipped, pairs)."""
    q_row, skipped, pairs = 0, 0, 0
    for q_lo, q_hi in q_segments:
        rows = slice(q_row, q_row + q_hi - q_lo)
        q_row += q_hi - q_lo
        outs, lses = [acc_out[rows]], [acc_lse[rows]]
        k_row = 0
        for k_lo, k_hi in kv_segments:
            keys = slice(k_row, k_row + k_hi - k_lo)
            k_row += k_hi - k_lo
            pairs += 1
            if k_lo >= q_hi:  # every key after every query: nothing seen
                skipped += 1
                continue
            if pattern is not None and pattern.cover(q_lo, q_hi, k_lo, k_hi) is BlockCover.EMPTY:
                skipped += 1  # every key left every window, and none is a sink or strided
                continue
            out, lse = attention_with_lse(
                q[rows], k[keys], v[keys], scale, causal=k_hi > q_lo, q_start=q_lo, k_start=k_lo, pattern=pattern
            )
            outs.append(out)
            lses.append(lse)
        if len(outs) > 1:
            acc_out[rows], acc_lse[rows] = merge_partials(outs, lses)
    return acc_out, acc_lse, skipped, pairs
