"""Where a request runs: the ring size, the workers, and which prompt positions each one holds.

Pure functions over the registry's view of the workers, testable without NATS.

Deadlock rule: a worker belongs to at most one multi-worker ring at a time. Ring members wait on
each other (point-to-point transfers, fusion merges) inside one compute thread per worker, so two
rings sharing two workers in opposite orders could wait on each other forever. Single-worker
requests wait on nobody and may share any worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.attention.layout import (
    placement_unit_tokens,
    ring_size_for,
    split_chunks,
    zigzag_assign,
)
from shared.attention.kv_need import freeing_pattern, windowed_kv_tokens
from shared.messages import GenerateRequest, KVQuant, ModelInfo, RingPlan, Segment
from shared.settings import Settings


def chunk_tokens_for(context_len: int, settings: Settings) -> int:
    """The policy chunk for a prompt, which sizes its ring: settings.chunk_tokens if set, else
    small/medium/large by length."""
    if settings.chunk_tokens is not None:
        return settings.chunk_tokens
    if context_len < settings.chunk_small_below:
        return settings.chunk_small_tokens
    if context_len <= settings.chunk_large_above:
        return settings.chunk_medium_tokens
    return settings.chunk_large_tokens


def kv_quant_for(req: GenerateRequest, settings: Settings) -> KVQuant:
    """The request's KV quantization: its own, else the cluster's default. Prefix lookups and the
    ring plan must agree on it (blocks are stored per quantization)."""
    return req.kv_quant or KVQuant(settings.kv_quant)


@dataclass(frozen=True)
class WorkerLoad:
    worker_id: str
    world_rank: int | None
    in_ring: bool  # already a member of an active multi-worker ring
    active_requests: int
    kv_tokens: int
    # KV tokens the worker can hold (its heartbeat's kv_capacity_tokens); None: unbounded
    capacity_tokens: int | None = None

    def has_room(self, tokens: int) -> bool:
        return self.capacity_tokens is None or self.kv_tokens + tokens <= self.capacity_tokens


def merge_runs(runs: list[tuple[int, int]]) -> list[Segment]:
    """Sorted [start, end) runs -> segments, adjacent runs joined."""
    segments: list[Segment] = []
    for start, end in sorted(runs):
        if segments and segments[-1].end == start:
            segments[-1] = Segment(start=segments[-1].start, end=end)
        else:
            segments.append(Segment(start=start, end=end))
    return segments


def deal_units(prompt_tokens: int, ring_size: int, settings: Settings) -> tuple[int, list[tuple[int, int]], list[list[int]]]:
    """(unit, units, the unit indices each member holds): the prompt in placement units
    (placement_unit_tokens), dealt zigzag; a ring of one holds them all."""
    unit = placement_unit_tokens(prompt_tokens, chunk_tokens_for(prompt_tokens, settings), ring_size,
                                 settings.kv_block_tokens)
    units = split_chunks(prompt_tokens, unit)
    if ring_size == 1:
        return unit, units, [list(range(len(units)))]
    return unit, units, zigzag_assign(len(units), ring_size)


def decode_reserve(max_new_tokens: int, settings: Settings) -> int:
    """The decode tokens placement keeps room for: all of max_new_tokens unless
    admission_decode_reserve_tokens caps it (overcommitting the KV pool: most requests stop
    before max_new_tokens, and a decode that finds the pool full is preempted, preemption.py)."""
    cap = settings.admission_decode_reserve_tokens
    return max_new_tokens if cap is None else min(max_new_tokens, cap)


def windowed_need(req: GenerateRequest, model: ModelInfo, settings: Settings) -> int | None:
    """The most KV tokens one worker holds for this request alone, whatever its length, when it
    gives back its pages behind its window (shared/attention/kv_need.py: a sliding or hybrid
    pattern, or a model whose every layer slides, and no prompt blocks for the prefix cache);
    None: it holds all its tokens. Rings are placed as for any request: their members keep their
    segments until the prefill ends."""
    pattern = req.attention.key_pattern() if req.attention is not None else None
    sliding = set(model.sliding_layers)
    layer_windows = [model.sliding_window if i in sliding else None for i in range(model.num_layers)]
    # main.py's `cacheable`: with the store on, a request without a pattern stores its prompt blocks
    stores_blocks = settings.kv_store_enabled and pattern is None
    window = freeing_pattern(pattern, layer_windows, stores_blocks)
    if window is None:
        return None
    return windowed_kv_tokens(window, settings.prefill_step_tokens, settings.kv_block_tokens)


def one_worker_tokens(total_tokens: int, windowed: int | None) -> int:
    """KV tokens one worker needs to hold a request of `total_tokens` alone (windowed_need)."""
    return total_tokens if windowed is None else min(total_tokens, windowed)


def member_max_tokens(prompt_tokens: int, max_new_tokens: int, ring_size: int, settings: Settings) -> int:
    """The most KV tokens one member of such a ring comes to hold: its prompt rows, or once
    decode has evened the members out, an equal share of prompt + new tokens (each new token's
    K/V goes to the member holding the fewest, see layout.append_member)."""
    total = prompt_tokens + max_new_tokens
    if ring_size == 1:
        return total
    _, units, assignment = deal_units(prompt_tokens, ring_size, settings)
    most = max(sum(units[u][1] - units[u][0] for u in held) for held in assignment)
    return max(most, -(-total // ring_size))


def choose_workers(prompt_tokens: int, chunk_tokens: int, workers: list[WorkerLoad], settings: Settings,
                   world_ready: bool, max_new_tokens: int = 0, prefer: str | None = None,
                   windowed: int | None = None) -> list[WorkerLoad]:
    """The ring for a prompt: as many free workers as its policy chunks need (up to all, up to
    max_ring_size); one worker when the prompt is one chunk or no ring can be formed now.
    Free: in the world and not already in a multi-worker ring (the deadlock rule above).
    KV capacity comes first: members must have room for their share of prompt + max_new_tokens,
    so the ring grows past the policy size (or, failing that, shrinks) until they do.
    One worker needs room for one_worker_tokens (`windowed`: windowed_need).
    [] when the request cannot be placed now: the caller waits or refuses (fits_cluster)."""
    if not workers:
        return []
    # `prefer`: the worker that may still hold the prompt's cached blocks (block_homes.py), first if it has room
    alone = one_worker_tokens(prompt_tokens + max_new_tokens, windowed)
    single = sorted((w for w in workers if w.has_room(alone)),
                    key=lambda w: (w.worker_id != prefer, w.active_requests, w.kv_tokens, w.worker_id))[:1]
    if not world_ready:
        return single
    free = sorted((w for w in workers if not w.in_ring and w.world_rank is not None),
                  key=lambda w: (w.active_requests, w.kv_tokens, w.worker_id))
    limit = min(settings.max_ring_size or len(free), len(free), prompt_tokens)  # a member holds >= 1 prompt token
    size = ring_size_for(prompt_tokens, chunk_tokens, len(free), settings.max_ring_size)
    if size < 2 and single:
        return single  # one chunk: one worker, the least loaded with room, ring member or not
    # The policy's size first, then larger rings (a smaller share each), then smaller ones.
    for n in [*range(max(size, 2), limit + 1), *range(size - 1, 1, -1)]:
        roomy = [w for w in free if w.has_room(member_max_tokens(prompt_tokens, max_new_tokens, n, settings))]
        if len(roomy) >= n:
            return roomy[:n]
    return single


def fits_cluster(prompt_tokens: int, max_new_tokens: int, workers: list[WorkerLoad], settings: Settings,
                 world_ready: bool, windowed: int | None = None) -> bool:
    """Whether the request could ever be placed on these workers, were they all idle: one
    worker, or a ring of at most max_ring_size members in the world (any worker while the world
    forms), whose capacities each hold what a member comes to hold (member_max_tokens).
    One worker holds one_worker_tokens (`windowed`: windowed_need)."""
    if not workers:
        return False
    alone = one_worker_tokens(prompt_tokens + max_new_tokens, windowed)
    if any(w.capacity_tokens is None or w.capacity_tokens >= alone for w in workers):
        return True
    ring_capable = [w for w in workers if w.world_rank is not None] if world_ready else workers
    capacities = sorted((w.capacity_tokens for w in ring_capable), key=lambda c: (c is not None, -(c or 0)))
    limit = min(settings.max_ring_size or len(capacities), len(capacities), prompt_tokens)
    return any(capacities[n - 1] is None or capacities[n - 1] >= member_max_tokens(prompt_tokens, max_new_tokens, n, settings)
               for n in range(2, limit + 1))


def plan_ring(request_id: str, prompt_tokens: int, ring: list[WorkerLoad], settings: Settings,
              world_generation: int, fusion_partition: str, kv_quant: KVQuant) -> RingPlan:
    """The prompt dealt zigzag over the ring in placement units (placement_unit_tokens: whole
    groups of 2N, never larger than the policy chunk, block-aligned when the chunk is); a ring of
    one holds [0, prompt_tokens) as one segment. The plan's chunk_tokens is the unit used."""
    unit, units, assignment = deal_units(prompt_tokens, len(ring), settings)
    segments = [merge_runs([units[u] for u in held]) for held in assignment]
    return RingPlan(
        request_id=request_id,
        workers=[w.worker_id for w in ring],
        world_ranks=[w.world_rank if w.world_rank is not None else -1 for w in ring],
        world_generation=world_generation,
        chunk_tokens=unit,
        segments=segments,
        prompt_tokens=prompt_tokens,
        fusion_partition=fusion_partition,
        fusion=settings.fusion,
        kv_quant=kv_quant,
    )


def member_tokens(plan: RingPlan) -> list[int]:
    return [sum(s.end - s.start for s in segs) for segs in plan.segments]
