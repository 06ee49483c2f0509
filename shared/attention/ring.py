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

With a sparse `pattern` (a sliding window, plus sinks or strided keys: pattern.py) most K/V rows
are seen by few members' queries, so passing every block around the whole ring moves data nobody
reads. Then each member sends each other member only the rows that member's queries can see
(rows_to_send), directly: one batch_isend_irecv of point-to-point ops to and from exactly the
members that exchange rows, posted before the member computes on its own block and waited for
after. A window shorter than a unit reaches one or two neighbouring units only: traffic falls
with the window instead of staying (N-1) x the prompt. Hybrid sends the window's rows plus the
sink rows [0, S). Strided sends a covering range per sender segment (from its first to its
last multiple of K a receiver's queries can see, with the window's rows): with a stride shorter
than a unit that is nearly every row before a receiver's last query, so under a zigzag layout
strided patterns usually keep the ring. The direct exchange runs when it moves at most half
the ring's rows (exchange_is_sparse), else the ring loop runs unchanged (still skipping the
compute of emptied blocks): both are exact, and the ring overlaps every step's transfer with
compute where the direct exchange only overlaps the local block. Both sides derive every size
from (kv_segments, query bounds, pattern), known to all members, so no size is ever exchanged.
Without a pattern (full attention) the ring always runs. Whichever schedule runs, a block the
window only cuts is computed tile by tile over the keys each query tile's window reaches
(attention_tiled in local.py), not densely and masked.

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

# The ring hides each step's transfer behind that step's compute; the direct exchange hides all
# of its transfers behind the local block only. A window that reaches (nearly) every key saves
# little beyond causality (about a quarter of the ring's rows under zigzag) while every block is
# computed: the ring is the better schedule there. A window that reaches a few units empties most
# of the ring's steps, whose transfers then have nothing to hide behind: sending fewer rows wins.
# Half the ring's rows separates the two (a heuristic, not tuned on hardware).
DIRECT_EXCHANGE_MAX_RING_FRACTION = 0.5


@dataclass(frozen=True)
class RingStep:
    step: int
    bytes_sent: int  # K/V bytes this member sent on this step (0 on the last)
    wait_ms: float  # host time blocked on the transfer after the step's compute
    blocks: int = 0  # (query segment, key segment) pairs of the step
    blocks_skipped: int = 0  # of those, the ones not computed: keys all after the queries, or masked out
    peers: int = 0  # members this member sent K/V rows to on this step


def member_index(ring_ranks: Sequence[int]) -> int:
    """This process's place in the ring (0 without torch.distributed on a ring of one)."""
    if len(ring_ranks) == 1 and not dist.is_initialized():
        return 0
    rank = dist.get_rank()
    if rank not in ring_ranks:
        raise ValueError(f"rank {rank} is not in the ring {list(ring_ranks)}")
    return list(ring_ranks).index(rank)


# ---- the sparse exchange: who sends whom which rows (pure functions of positions) -----------


def union_segments(segments: Sequence[Segment]) -> list[Segment]:
    """Non-empty segments sorted and joined where they overlap or touch: [(5,9),(0,3),(2,4)] -> [(0,4),(5,9)]."""
    merged: list[Segment] = []
    for lo, hi in sorted(seg for seg in segments if seg[1] > seg[0]):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def segments_within(inner: Sequence[Segment], outer: Sequence[Segment]) -> bool:
    """Whether every position of `inner` is a position of `outer`."""
    covers = union_segments(outer)
    return all(any(o_lo <= lo and hi <= o_hi for o_lo, o_hi in covers) for lo, hi in inner if hi > lo)


def rows_to_send(sender_kv: Sequence[Segment], receiver_queries: Sequence[Segment],
                 pattern: KeyPattern | None) -> list[Segment]:
    """The positions of a sender's K/V rows that a receiver's queries see, as disjoint ascending
    segments inside sender_kv, in the sender's row order: what one member sends another.

    A query at i sees a key at j <= i that the pattern keeps (pattern.py). So a query segment
    [lo, hi) sees the window's keys [lo - W + 1, hi) and the sinks [0, S) (those <= its last
    query); strided keys are sent as a covering range per sender segment: from its first to its
    last multiple of K below the receiver's last query, every row between included (contiguous
    rows travel as one slice; the receiver's mask drops the ones it does not see). Without a
    window (full attention) every key before the receiver's last query."""
    queries = [(lo, hi) for lo, hi in receiver_queries if hi > lo]
    if not queries:
        return []
    keys_end = max(hi for _, hi in queries)  # causal: no query sees a key at or after this
    if pattern is None or pattern.is_full:
        seen = [(0, keys_end)]
    else:
        seen = [(max(0, lo - pattern.window + 1), hi) for lo, hi in queries]
        seen.append((0, min(pattern.sinks, keys_end)))
    rows: list[Segment] = []
    for kv_lo, kv_hi in sender_kv:
        wanted = [(max(kv_lo, lo), min(kv_hi, hi)) for lo, hi in seen]
        if pattern is not None and pattern.stride is not None and not pattern.is_full:
            end = min(kv_hi, keys_end)
            first = -(-kv_lo // pattern.stride) * pattern.stride  # the first multiple of K >= kv_lo
            last = (end - 1) // pattern.stride * pattern.stride  # the last multiple of K < end
            wanted.append((first, last + 1))
        rows.extend(union_segments(wanted))
    return rows


def exchange_plan(kv_segments: Sequence[Sequence[Segment]], query_bounds: Sequence[Sequence[Segment]],
                  pattern: KeyPattern | None) -> list[list[list[Segment]]]:
    """sends[a][b]: the positions member a sends member b (rows_to_send); nothing to itself.
    Every member computes the same plan, so sender and receiver agree on every size."""
    size = len(kv_segments)
    return [[rows_to_send(kv_segments[a], query_bounds[b], pattern) if a != b else [] for b in range(size)]
            for a in range(size)]


def exchange_is_sparse(plan: Sequence[Sequence[Sequence[Segment]]], kv_segments: Sequence[Sequence[Segment]]) -> bool:
    """Whether the direct exchange moves at most DIRECT_EXCHANGE_MAX_RING_FRACTION of the rows the
    ring moves (every member's rows to each of the N - 1 others)."""
    ring_rows = (len(kv_segments) - 1) * sum(segment_tokens(list(member)) for member in kv_segments)
    direct_rows = sum(segment_tokens(list(rows)) for sends in plan for rows in sends)
    return direct_rows <= DIRECT_EXCHANGE_MAX_RING_FRACTION * ring_rows


def local_rows(segments: Sequence[Segment], positions: Sequence[Segment]) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of a member's tensors (rows are its segments in order) holding
    `positions`, sub-ranges of its segments: -> [(row_lo, row_hi), ...] in the same order."""
    starts, row = [], 0
    for lo, hi in segments:
        starts.append(row)
        row += hi - lo
    ranges = []
    for lo, hi in positions:
        index = next(i for i, (s_lo, s_hi) in enumerate(segments) if s_lo <= lo and hi <= s_hi)
        ranges.append((starts[index] + lo - segments[index][0], starts[index] + hi - segments[index][0]))
    return ranges


def parent_segment(segments: Sequence[Segment], position: int) -> int:
    """Index of the segment holding `position`."""
    return next(i for i, (lo, hi) in enumerate(segments) if lo <= position < hi)


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
    query_bounds: Sequence[Sequence[Segment]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of this member's q [tq, H, d] over the ring's keys (with `pattern`, only
    the keys it keeps: a sliding window, plus sinks or strided keys; pattern.py).

    k, v: [tk, KVH, d], this member's rows of kv_segments[me].
    q_segments: positions of q's rows (default: kv_segments[me]).
    on_step: called after each ring step with what it sent, how long the host waited for the
    transfer after computing and how many (query segment, key segment) blocks it skipped
    (tracing and the ring-latency metric use it). The direct exchange of a sparse pattern is one
    step: every byte this member sent, to `peers` members.
    query_bounds: every member's query positions or a superset of them, the same list on every
    member (default kv_segments: a member's queries are some of its own tokens, as with prefix
    caching, whose cached length members need not agree on). Only a sparse pattern reads it:
    what a member is sent is what these bounds can see, so q_segments must lie inside
    query_bounds[me]; tighter bounds send fewer rows.
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
    if ring_size > 1 and pattern is not None and not pattern.is_full:
        bounds = kv_segments if query_bounds is None else query_bounds
        plan = exchange_plan(kv_segments, bounds, pattern)
        if exchange_is_sparse(plan, kv_segments):
            if not segments_within(q_segments, bounds[me]):
                raise ValueError(f"q_segments {q_segments} reach outside query_bounds[{me}] {list(bounds[me])}")
            return _direct_exchange(q, k, v, scale, q_segments, kv_segments, ring_ranks, me, plan, group, on_step,
                                    pattern)
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
            on_step(RingStep(step=step, bytes_sent=sent, wait_ms=wait_ms, blocks=blocks, blocks_skipped=skipped,
                             peers=1 if sent else 0))
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


def _direct_exchange(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_segments: Sequence[Segment],
    kv_segments: Sequence[Sequence[Segment]],
    ring_ranks: Sequence[int],
    me: int,
    plan: Sequence[Sequence[Sequence[Segment]]],
    group: dist.ProcessGroup | None,
    on_step: Callable[[RingStep], None] | None,
    pattern: KeyPattern,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention of a sparse pattern: send each member the rows its queries see (plan[me][b]),
    receive the rows this member's queries see (plan[a][me]), compute on the local block meanwhile."""
    size = len(ring_ranks)
    _, heads, dim = q.shape
    kv_heads = k.shape[1]
    ops, bytes_sent, peers = [], 0, 0
    for b in range(size):
        if plan[me][b]:
            # [2, rows, KVH, d]: the rows b sees, K and V as one contiguous buffer
            ranges = local_rows(kv_segments[me], plan[me][b])
            outgoing = torch.stack((torch.cat([k[lo:hi] for lo, hi in ranges]),
                                    torch.cat([v[lo:hi] for lo, hi in ranges])))
            ops.append(dist.P2POp(dist.isend, outgoing, ring_ranks[b], group))
            bytes_sent += outgoing.numel() * outgoing.element_size()
            peers += 1
    incoming = {}
    for a in range(size):
        if plan[a][me]:
            incoming[a] = torch.empty((2, segment_tokens(list(plan[a][me])), kv_heads, dim), dtype=k.dtype,
                                      device=k.device)
            ops.append(dist.P2POp(dist.irecv, incoming[a], ring_ranks[a], group))
    transfer = dist.batch_isend_irecv(ops) if ops else []

    # Pairs are counted against the members' whole key segments (as the ring counts them): a
    # segment that arrives as several row ranges (sinks and window) is one pair, computed or not.
    computed: set[tuple[int, tuple[int, int]]] = set()
    acc_out, acc_lse = empty_partial(q.shape[0], heads, dim, q.device)
    acc_out, acc_lse, _, _ = _fold_block(acc_out, acc_lse, q, q_segments, k, v, kv_segments[me], scale, pattern,
                                         computed=computed, key_ids=[(me, i) for i in range(len(kv_segments[me]))])
    t0 = time.perf_counter()
    for work in transfer:
        work.wait()
    wait_ms = (time.perf_counter() - t0) * 1000
    for a, block in incoming.items():  # in member order: the same merge order on every run
        key_ids = [(a, parent_segment(kv_segments[a], lo)) for lo, _ in plan[a][me]]
        acc_out, acc_lse, _, _ = _fold_block(acc_out, acc_lse, q, q_segments, block[0], block[1], plan[a][me], scale,
                                             pattern, computed=computed, key_ids=key_ids)
    if on_step is not None:
        blocks = len(q_segments) * sum(len(member) for member in kv_segments)
        on_step(RingStep(step=0, bytes_sent=bytes_sent, wait_ms=wait_ms, blocks=blocks,
                         blocks_skipped=blocks - len(computed), peers=peers))
    return acc_out, acc_lse


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
    *,
    computed: set | None = None,
    key_ids: Sequence | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Merge the attention of every query segment over one block's key segments into acc
    -> (acc_out, acc_lse, pairs skipped, pairs). With `computed`, (query segment index,
    key_ids[key segment index]) is added to it for every pair computed."""
    q_row, skipped, pairs = 0, 0, 0
    for q_index, (q_lo, q_hi) in enumerate(q_segments):
        rows = slice(q_row, q_row + q_hi - q_lo)
        q_row += q_hi - q_lo
        outs, lses = [acc_out[rows]], [acc_lse[rows]]
        k_row = 0
        for k_index, (k_lo, k_hi) in enumerate(kv_segments):
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
            if computed is not None:
                computed.add((q_index, k_index if key_ids is None else key_ids[k_index]))
        if len(outs) > 1:
            acc_out[rows], acc_lse[rows] = merge_partials(outs, lses)
    return acc_out, acc_lse, skipped, pairs
