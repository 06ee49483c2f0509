"""The scheduler's placement: ring size and worker choice, and the zigzag segments of a plan."""

from __future__ import annotations

import pytest

from services.scheduler.placement import (
    WorkerLoad,
    choose_workers,
    chunk_tokens_for,
    fits_cluster,
    kv_quant_for,
    member_tokens,
    plan_ring,
)
from shared.attention.layout import placement_unit_tokens, zigzag_segments
from shared.messages import GenerateRequest, KVQuant
from shared.settings import Settings


def test_chunk_size_policy():
    s = Settings()
    assert chunk_tokens_for(s.chunk_small_below - 1, s) == s.chunk_small_tokens
    assert chunk_tokens_for(s.chunk_small_below, s) == s.chunk_medium_tokens
    assert chunk_tokens_for(s.chunk_large_above, s) == s.chunk_medium_tokens
    assert chunk_tokens_for(s.chunk_large_above + 1, s) == s.chunk_large_tokens
    assert chunk_tokens_for(10, Settings(chunk_tokens=5)) == 5
    assert chunk_tokens_for(10**6, Settings(chunk_tokens=5)) == 5


def test_kv_quant_is_the_request_s_else_the_cluster_default():
    assert kv_quant_for(GenerateRequest(prompt="x"), Settings(kv_quant="int8")) == KVQuant.INT8
    assert kv_quant_for(GenerateRequest(prompt="x", kv_quant="int4"), Settings(kv_quant="int8")) == KVQuant.INT4
    assert kv_quant_for(GenerateRequest(prompt="x"), Settings()) == KVQuant.NONE


def loads(n: int, **overrides: dict[str, object]) -> list[WorkerLoad]:
    """n idle workers w0.. with world ranks 0..; overrides: worker id -> changed fields."""
    out = []
    for i in range(n):
        fields = dict(worker_id=f"w{i}", world_rank=i, in_ring=False, active_requests=0, kv_tokens=0)
        fields.update(overrides.get(f"w{i}", {}))
        out.append(WorkerLoad(**fields))
    return out


def choose(prompt_tokens: int, workers: list[WorkerLoad], settings: Settings, world_ready: bool = True) -> list[str]:
    chunk = chunk_tokens_for(prompt_tokens, settings)
    return [w.worker_id for w in choose_workers(prompt_tokens, chunk, workers, settings, world_ready)]


def plan(prompt_tokens: int, ring_size: int, settings: Settings):
    return plan_ring("r", prompt_tokens, loads(ring_size), settings, world_generation=1, fusion_partition="p",
                     kv_quant=KVQuant.NONE)


def causal_work(segments) -> int:
    """Keys the queries of a member's positions attend causally: sum over held p of (p + 1).
    segments: Segment messages or (start, end) tuples."""
    spans = [(s.start, s.end) if hasattr(s, "start") else s for s in segments]
    return sum((start + 1 + end) * (end - start) // 2 for start, end in spans)


def tail_work(prompt_tokens: int, unit: int, ring_size: int) -> int:
    """The stated tolerance: the causal work of the positions missing from the last group of 2N
    units. The prompt padded to whole groups of 2N full units would balance exactly (member i's
    units i and 2N-1-i of every group add up to the same work); only these positions are missing,
    so no member is further than their work from the mean."""
    units = -(-prompt_tokens // unit)
    groups = -(-units // (2 * ring_size))
    padded = groups * 2 * ring_size * unit
    return sum(p + 1 for p in range(prompt_tokens, padded))


# ------------------------------------------------------------------------------ ring size


def test_a_prompt_of_one_chunk_runs_on_the_least_loaded_worker():
    s = Settings(chunk_tokens=10)
    workers = loads(4, w0={"active_requests": 2}, w1={"kv_tokens": 50}, w3={"in_ring": True})
    assert choose(10, workers, s) == ["w2"]
    # a single-worker request may share a ring member's worker: it waits on nobody
    assert choose(10, loads(2, w0={"in_ring": True, "active_requests": 1}, w1={"active_requests": 2}), s) == ["w0"]
    assert choose(10, [], s) == []


def test_a_long_prompt_gets_as_many_workers_as_its_chunks_up_to_free_and_max_ring():
    s = Settings(chunk_tokens=10)
    assert choose(50, loads(8), s) == ["w0", "w1", "w2", "w3", "w4"]  # 5 chunks
    assert choose(41, loads(8), s) == ["w0", "w1", "w2", "w3", "w4"]  # the last chunk is short
    assert choose(500, loads(3), s) == ["w0", "w1", "w2"]  # all free workers
    assert choose(500, loads(8), Settings(chunk_tokens=10, max_ring_size=4)) == ["w0", "w1", "w2", "w3"]
    # the policy chunk decides: 128K tokens are 8 chunks of 16K
    assert len(choose(128 * 1024, loads(16), Settings())) == 8
    # least loaded first
    busy = loads(4, w0={"active_requests": 3}, w1={"kv_tokens": 9})
    assert choose(20, busy, s) == ["w2", "w3"]


def test_workers_in_another_ring_or_outside_the_world_are_not_ring_members():
    s = Settings(chunk_tokens=10)
    workers = loads(5, w1={"in_ring": True}, w3={"world_rank": None})
    assert choose(100, workers, s) == ["w0", "w2", "w4"]
    # one free worker left: no ring, the prompt runs on one (the least loaded of all)
    workers = loads(3, w0={"in_ring": True}, w1={"in_ring": True, "active_requests": 1}, w2={"active_requests": 1})
    assert choose(100, workers, s) == ["w0"]


def test_without_a_ready_world_every_request_runs_on_one_worker():
    s = Settings(chunk_tokens=10)
    assert choose(100, loads(4, w0={"kv_tokens": 5}), s, world_ready=False) == ["w1"]


# ------------------------------------------------------------------------------ segments


SHAPES = [  # (prompt tokens, settings, ring size)
    (128 * 1024, Settings(), 8),  # 8 policy chunks of 16K over 8 members: units of 8K
    (30, Settings(chunk_tokens=7), 2),
    (30, Settings(chunk_tokens=7), 3),
    (30, Settings(chunk_tokens=7), 4),
    (45, Settings(chunk_tokens=7), 4),
    (131_073, Settings(chunk_tokens=16_000), 8),  # chunk not a block multiple: no rounding
    (100_000, Settings(), 7),  # block-rounded units
    (1_000_000, Settings(), 8),
    (64, Settings(chunk_tokens=16, kv_block_tokens=16), 4),
]


@pytest.mark.parametrize("prompt_tokens,settings,ring_size", SHAPES)
def test_segments_cover_the_prompt_once_in_units_of_the_reported_size(prompt_tokens, settings, ring_size):
    p = plan(prompt_tokens, ring_size, settings)
    chunk = chunk_tokens_for(prompt_tokens, settings)
    assert p.size == ring_size and len(p.segments) == ring_size
    assert p.chunk_tokens == placement_unit_tokens(prompt_tokens, chunk, ring_size, settings.kv_block_tokens)
    assert p.chunk_tokens <= chunk
    held = sorted(pos for segs in p.segments for s in segs for pos in range(s.start, s.end))
    assert held == list(range(prompt_tokens))
    # the segments are the zigzag of the reported unit, every member holds some
    assert [[(s.start, s.end) for s in segs] for segs in p.segments] == zigzag_segments(
        prompt_tokens, p.chunk_tokens, ring_size)
    assert all(member_tokens(p))
    assert p.units == -(-prompt_tokens // p.chunk_tokens) >= ring_size
    assert p.leader() == next(m for m, segs in enumerate(p.segments) if any(s.end == prompt_tokens for s in segs))


@pytest.mark.parametrize("prompt_tokens,settings,ring_size", SHAPES)
def test_every_member_does_the_mean_causal_work_up_to_the_missing_tail(prompt_tokens, settings, ring_size):
    p = plan(prompt_tokens, ring_size, settings)
    work = [causal_work(segs) for segs in p.segments]
    mean = sum(work) / ring_size
    tolerance = tail_work(prompt_tokens, p.chunk_tokens, ring_size)
    assert all(abs(w - mean) <= tolerance for w in work), (work, tolerance)


def test_balance_of_the_motivating_shapes():
    # 128K tokens, 16K chunks, 8 members: exactly equal (the old layout: one chunk each, the last
    # member doing 15 times the first one's work)
    p = plan(128 * 1024, 8, Settings())
    assert p.chunk_tokens == 8192 and p.units == 16
    assert len({causal_work(segs) for segs in p.segments}) == 1
    old = [causal_work(segs) for segs in zigzag_segments(128 * 1024, 16 * 1024, 8)]
    assert 14.99 < max(old) / min(old) < 15.01
    # 30 tokens in chunks of 7 (5 chunks): 3 members, 6 units of 5, exactly equal
    p = plan(30, 3, Settings(chunk_tokens=7))
    assert p.chunk_tokens == 5 and len({causal_work(segs) for segs in p.segments}) == 1
    # 2 and 4 members: 8 units of 4, the last one 2 tokens short (member 0 holds it)
    for ring_size, spread in ((2, 0.14), (4, 0.41)):
        p = plan(30, ring_size, Settings(chunk_tokens=7))
        work = [causal_work(segs) for segs in p.segments]
        mean = sum(work) / ring_size
        assert p.chunk_tokens == 4 and max(abs(w - mean) / mean for w in work) <= spread
        assert len(set(work[1:])) == 1  # every other member exactly equal


def test_large_prompts_are_balanced_within_one_percent_without_block_rounding():
    for prompt_tokens, chunk, ring_size in ((131_073, 16_000, 8), (1_000_003, 30_000, 8), (300_001, 16_000, 5)):
        p = plan(prompt_tokens, ring_size, Settings(chunk_tokens=chunk))
        work = [causal_work(segs) for segs in p.segments]
        assert max(work) / min(work) < 1.01


def test_units_are_block_multiples_when_the_chunk_is():
    for prompt_tokens, settings, ring_size in [
        (128 * 1024, Settings(), 8), (100_000, Settings(), 7), (131_073, Settings(), 8), (300_000, Settings(), 5),
        (1_000_000, Settings(), 8), (70, Settings(chunk_tokens=32, kv_block_tokens=16), 3),
        (64, Settings(chunk_tokens=16, kv_block_tokens=16), 4),
    ]:
        p = plan(prompt_tokens, ring_size, settings)
        assert p.chunk_tokens % settings.kv_block_tokens == 0, (prompt_tokens, p.chunk_tokens)
        assert p.chunk_tokens <= chunk_tokens_for(prompt_tokens, settings)
        # so every segment boundary inside the prompt is a block boundary: no block straddles members
        bounds = {b for segs in p.segments for s in segs for b in (s.start, s.end)} - {prompt_tokens}
        assert all(b % settings.kv_block_tokens == 0 for b in bounds)
    # a chunk that is not a block multiple is not rounded
    assert plan(30, 2, Settings(chunk_tokens=7, kv_block_tokens=4)).chunk_tokens == 4
    assert plan(60, 2, Settings(chunk_tokens=24, kv_block_tokens=16)).chunk_tokens == 15


def test_one_worker_holds_the_prompt_as_one_segment_in_policy_chunks():
    for prompt_tokens in (1, 6, 100, 200_000):
        s = Settings(chunk_tokens=7)
        p = plan(prompt_tokens, 1, s)
        assert [[(x.start, x.end) for x in segs] for segs in p.segments] == [[(0, prompt_tokens)]]
        assert p.chunk_tokens == 7 and p.units == -(-prompt_tokens // 7) and p.leader() == 0


# ------------------------------------------------------------------------------ KV capacity


def choose_new(prompt_tokens: int, new_tokens: int, workers: list[WorkerLoad], settings: Settings,
               world_ready: bool = True) -> list[str]:
    chunk = chunk_tokens_for(prompt_tokens, settings)
    return [w.worker_id for w in choose_workers(prompt_tokens, chunk, workers, settings, world_ready, new_tokens)]


def test_a_prompt_too_big_for_one_worker_gets_a_ring_not_an_overfilled_worker():
    s = Settings(chunk_tokens=1000)  # one policy chunk: without capacities this runs on one worker
    cap = {f"w{i}": {"capacity_tokens": 400} for i in range(4)}
    assert choose_new(500, 100, loads(4, **cap), s) == ["w0", "w1"]  # 300 each
    assert choose_new(1000, 100, loads(4, **cap), s) == ["w0", "w1", "w2"]  # 367 each
    assert choose_new(300, 100, loads(4, **cap), s) == ["w0"]  # fits one
    assert choose_new(2, 1000, loads(4, **cap), s) == []  # a ring of 3 needs 3 prompt tokens to deal
    # the world is re-forming: no ring now, and no worker could hold it alone -> wait
    assert choose_new(500, 100, loads(4, **cap), s, world_ready=False) == []


def test_workers_without_room_are_skipped_and_a_full_cluster_waits():
    s = Settings(chunk_tokens=100)
    workers = loads(3, w0={"capacity_tokens": 1000, "kv_tokens": 950}, w1={"capacity_tokens": 1000},
                    w2={"capacity_tokens": 1000})
    # the policy asks for 3 (3 chunks) but w0 has 50 left for a share of 100: a ring of 2 then
    assert choose_new(300, 0, workers, s) == ["w1", "w2"]
    busy = loads(3, **{f"w{i}": {"capacity_tokens": 1000, "kv_tokens": 950} for i in range(3)})
    assert choose_new(300, 0, busy, s) == []


def test_fits_cluster_is_about_capacity_when_idle_and_the_ring_limit():
    s = Settings(chunk_tokens=100)
    capped = loads(4, **{f"w{i}": {"capacity_tokens": 100, "kv_tokens": 100} for i in range(4)})
    assert fits_cluster(300, 100, capped, s, world_ready=True)  # busy now, but idle they hold 4 x 100
    assert not fits_cluster(300, 101, capped, s, world_ready=True)
    assert not fits_cluster(300, 0, capped, Settings(chunk_tokens=100, max_ring_size=2), world_ready=True)
    assert not fits_cluster(2, 298, capped, s, world_ready=True)  # 2 prompt tokens make a ring of 2 at most
    assert fits_cluster(1, 10**9, loads(2), s, world_ready=True)  # no capacity reported: unbounded
    assert not fits_cluster(1, 0, [], s, world_ready=True)
    # workers left out of the world (another device kind) hold single-worker requests only
    outside = loads(4, **{f"w{i}": {"capacity_tokens": 100, "world_rank": None if i > 1 else i} for i in range(4)})
    assert fits_cluster(100, 0, outside, s, world_ready=True) and not fits_cluster(300, 0, outside, s, world_ready=True)
    assert fits_cluster(300, 0, outside, s, world_ready=False)  # while the world forms, any may join


def test_member_max_tokens_counts_block_rounded_units_and_decode_evening_out():
    from services.scheduler.placement import member_max_tokens

    s = Settings(chunk_tokens=4096, kv_block_tokens=128)
    # 10,000 tokens over 4: units rounded to 1280 (1250 unrounded) -> members hold up to 2560
    assert member_max_tokens(10_000, 0, 4, s) == 2560
    assert member_max_tokens(10_000, 4000, 4, s) == 3500  # decode evens them out above that
    assert member_max_tokens(10_000, 5, 1, s) == 10_005
    plan = plan_ring("r", 10_000, loads(4), s, world_generation=1, fusion_partition="p", kv_quant=KVQuant.NONE)
    assert max(member_tokens(plan)) == 2560


def test_worker_kv_capacity_from_settings_or_device_memory():
    from services.worker.capacity import kv_bytes_per_token, kv_capacity_tokens
    from shared.messages import ModelInfo

    model = ModelInfo(name="m", vocab_size=10, num_layers=32, num_kv_heads=8, head_dim=128,
                      max_position_embeddings=10, dtype="bfloat16")
    assert kv_bytes_per_token(model) == 2 * 32 * 8 * 128 * 2  # 128 KiB: Llama-3-8B in bf16
    assert kv_capacity_tokens(Settings(), model, None) is None  # CPU: no limit
    assert kv_capacity_tokens(Settings(worker_max_tokens=5000), model, 10**12) == 5000
    free = 100 * 1024**3  # 100 GiB free after the weights
    assert kv_capacity_tokens(Settings(kv_memory_fraction=0.5), model, free) == 50 * 1024**3 // (128 * 1024)
