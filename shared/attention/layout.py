"""Where a prompt's tokens live on a ring: units, chunks, zigzag placement. Pure functions.

A segment is a half-open range of global token positions (start, end). A ring member holds
the q/k/v rows of its segments concatenated in segment order.

Zigzag placement balances causal work: with 2N units on N members, member i holds units i
and 2N-1-i, so an early (cheap) unit pairs with a late (expensive) one. More units repeat
the pattern over groups of 2N. The policy chunk (chunk_tokens_for, a scheduling policy in
services/scheduler/placement.py) decides how many members a prompt needs; the units it is dealt
in come from placement_unit_tokens, so that there are always whole groups of 2N of them.
"""

from __future__ import annotations

from shared.positions import Run, run_tokens

Segment = Run  # a run of positions a ring member holds (shared/positions.py)


def placement_unit_tokens(total_tokens: int, chunk_tokens: int, ring_size: int, block_tokens: int | None = None) -> int:
    """The size of the units a prompt is dealt zigzag in over a ring of ring_size members.

    Why not the policy chunk itself: zigzag balances causal work only over whole groups of 2N
    equal units. With fewer policy chunks than 2N (128K tokens in 16K chunks over 8 members: one
    chunk each) the last member does 2N-1 times the first one's work and every ring step waits
    on it; a chunk count that is not a multiple of 2N is uneven too. So the prompt is cut into
    2N * ceil(n_chunks / 2N) units of ceil(total / units) tokens: every member gets the same
    number of units, and a unit is never larger than the policy chunk (the ring size, chosen by
    policy chunks, still bounds what one member holds).

    When the policy chunk is a multiple of block_tokens the unit is rounded up to a multiple of
    block_tokens (never above the chunk): a KV block straddling two members is never stored, so
    unaligned units would end prefix caching on rings at the first unit boundary. If rounding
    would leave fewer than ring_size units (a prompt of a few blocks), the unit stays unrounded:
    then no smaller block multiple gives ring_size units either.

    What is left of the imbalance: split_chunks makes every unit but the last one full, so
    units * unit - total tokens are missing at the end of the prompt (a shorter last unit, or
    fewer units than planned), in the units dealt to the first members. Without rounding that
    is fewer than `units` tokens; rounding adds up to block_tokens - 1 per planned unit.

    A ring of one holds the whole prompt in one segment: its unit is the policy chunk.
    """
    if total_tokens < 1 or chunk_tokens < 1 or ring_size < 1:
        raise ValueError(f"need positive sizes, got total_tokens={total_tokens}, chunk_tokens={chunk_tokens}, "
                         f"ring_size={ring_size}")
    if total_tokens < ring_size:
        raise ValueError(f"{total_tokens} tokens cannot be placed on {ring_size} members")
    if ring_size == 1:
        return chunk_tokens
    n_chunks = -(-total_tokens // chunk_tokens)
    group = 2 * ring_size
    units = group * -(-n_chunks // group)
    unit = -(-total_tokens // units)
    if not block_tokens or chunk_tokens % block_tokens:
        return unit
    rounded = min(chunk_tokens, -(-unit // block_tokens) * block_tokens)
    return rounded if -(-total_tokens // rounded) >= ring_size else unit


def split_chunks(total_tokens: int, chunk_tokens: int) -> list[Segment]:
    """[0, total) cut into chunks of chunk_tokens; the last one may be shorter."""
    if total_tokens < 0 or chunk_tokens < 1:
        raise ValueError(f"need total_tokens >= 0 and chunk_tokens >= 1, got {total_tokens}, {chunk_tokens}")
    return [(s, min(s + chunk_tokens, total_tokens)) for s in range(0, total_tokens, chunk_tokens)]


def zigzag_member(chunk: int, ring_size: int) -> int:
    """The member holding chunk `chunk`: 0, 1, ..., N-1, N-1, ..., 1, 0, then again."""
    r = chunk % (2 * ring_size)
    return r if r < ring_size else 2 * ring_size - 1 - r


def zigzag_assign(n_chunks: int, ring_size: int) -> list[list[int]]:
    """Chunk (or unit) indices held by each ring member, ascending. Any count from ring_size up:
    a partial last group of 2N continues the same pattern."""
    if ring_size < 1 or n_chunks < ring_size:
        raise ValueError(f"need 1 <= ring_size <= n_chunks, got ring_size={ring_size}, n_chunks={n_chunks}")
    members: list[list[int]] = [[] for _ in range(ring_size)]
    for chunk in range(n_chunks):
        members[zigzag_member(chunk, ring_size)].append(chunk)
    return members


def merge_adjacent(segments: list[Segment]) -> list[Segment]:
    """Segments in order, with touching neighbours joined: [(0,5),(5,8),(12,14)] -> [(0,8),(12,14)]."""
    merged: list[Segment] = []
    for start, end in segments:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def zigzag_segments(total_tokens: int, chunk_tokens: int, ring_size: int) -> list[list[Segment]]:
    """Each member's segments for a prompt of total_tokens split into chunks, zigzag-placed."""
    chunks = split_chunks(total_tokens, chunk_tokens)
    return [merge_adjacent([chunks[c] for c in held]) for held in zigzag_assign(len(chunks), ring_size)]


def ring_size_for(context_len: int, chunk_tokens: int, free_workers: int, max_ring: int) -> int:
    """Members for one request: no more than the free workers, max_ring (0: no cap), or chunks.

    0 means no worker is free.
    """
    n_chunks = -(-context_len // chunk_tokens)
    cap = max_ring or free_workers
    return max(0, min(free_workers, cap, n_chunks))


segment_tokens = run_tokens  # the ring's name for it


def causal_block_sparsity(q_segments: list[Segment], kv_segments: list[list[Segment]]) -> tuple[int, int]:
    """(skipped, total) (query segment, key segment) pairs of a causal ring prefill: a key
    segment entirely after a query segment is never computed."""
    pairs = [(q, k) for q in q_segments for member in kv_segments for k in member]
    return sum(1 for q, k in pairs if k[0] >= q[1]), len(pairs)


def append_member(tokens_held: list[int]) -> int:
    """The ring member that stores the next decode token's K/V: the one holding the fewest."""
    return min(range(len(tokens_held)), key=lambda m: (tokens_held[m], m))
