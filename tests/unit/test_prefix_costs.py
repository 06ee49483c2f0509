"""The prefix cache's cost model (issue 10 item 4): cached K/V are loaded only when this
worker's measured load rate beats its measured prefill rate; a slow tier is skipped, and tried
again now and then. Driven through the worker's real prefill path with a tiny model and a
prefix cache whose loads are slow (an injected slow tier)."""

from __future__ import annotations

import asyncio
import time

import pytest
from opentelemetry import metrics, trace

from services.worker.aborts import AbortFlags
from services.worker.kv_cache import CachedRows
from services.worker.prefill_path import PrefillPath
from services.worker.prefix_costs import PrefixCosts, Rate
from shared.kv.metrics import StoreMetrics
from shared.messages import PrefillCommand, RingPlan, SamplingParams, Segment
from shared.metrics import RingserveMetrics
from shared.settings import Settings
from tests.helpers.engines import make_engine, tiny_llama

CACHED = 16  # of the 24-token prompts below
PROBE_EVERY = 3


def test_rates_are_running_averages_and_ignore_empty_measurements():
    rate = Rate(weight=0.5)
    assert rate.per_s is None
    rate.add(100, 1.0)
    rate.add(300, 1.0)
    rate.add(0, 1.0)
    rate.add(10, 0.0)
    assert rate.per_s == pytest.approx(200.0)


def test_the_faster_side_wins_unmeasured_loads_are_tried_and_a_losing_tier_is_probed():
    costs = PrefixCosts(weight=1.0, probe_every=PROBE_EVERY)
    assert costs.decide(1000, "none").load  # nothing measured: try it
    costs.prefill.add(10_000, 1.0)
    costs.load_rate("none").add(1_000, 1.0)  # ten times slower than computing
    decisions = [costs.decide(1000, "none") for _ in range(2 * PROBE_EVERY)]
    assert [d.load for d in decisions] == [False, False, True] * 2
    assert decisions[2].probe and not decisions[0].probe
    assert decisions[0].load_s == pytest.approx(1.0) and decisions[0].compute_s == pytest.approx(0.1)
    assert decisions[0].saved_s == pytest.approx(0.9)
    assert costs.decide(1000, "int4").load  # another quant mode is its own tier
    costs.load_rate("none").add(1_000_000, 1.0)  # the store became fast
    assert costs.decide(1000, "none").load


class SlowPrefix:
    """The worker's PrefixCache as the prefill path sees it, serving `rows` after `delay_s`."""

    def __init__(self, rows: CachedRows, delay_s: float):
        self.rows, self.delay_s, self.loads = rows, delay_s, 0
        self.store = type("Store", (), {"metrics": StoreMetrics(metrics.get_meter("test"))})()

    async def load(self, cmd: PrefillCommand) -> CachedRows:
        self.loads += 1
        await asyncio.sleep(self.delay_s)
        return self.rows


class NoBus:
    async def publish(self, subject, message) -> None:
        pass


def command(request_id: str, ids: list[int], cached: int) -> PrefillCommand:
    plan = RingPlan(request_id=request_id, workers=["w"], world_ranks=[0], world_generation=0, chunk_tokens=len(ids),
                    segments=[[Segment(start=0, end=len(ids))]], prompt_tokens=len(ids), fusion_partition="p")
    return PrefillCommand(plan=plan, member=0, input_ids=ids, sampling=SamplingParams(), cached_tokens=cached)


def setup(settings: Settings, delay_s: float):
    """An engine, the first token of a full prefill, and a prefill path over a slow tier."""
    engine = make_engine(tiny_llama())
    ids = [(i * 5 + 1) % 90 for i in range(24)]
    full = engine.prefill(command("full", ids, 0))
    kv = engine.requests["full"].kv
    rows = CachedRows(CACHED, [kv.keys(i, 0, CACHED) for i in range(kv.num_layers)],
                      [kv.values(i, 0, CACHED) for i in range(kv.num_layers)])
    prefix = SlowPrefix(rows, delay_s)
    loop = asyncio.get_running_loop()

    async def compute(fn, *args):
        return await loop.run_in_executor(None, fn, *args)

    path = PrefillPath(engine, prefix, None, AbortFlags(ttl_s=60), settings, NoBus(), trace.get_tracer("test"),
                       RingserveMetrics(metrics.get_meter("test")), compute, loop)
    return engine, ids, full, prefix, path


async def hits(engine, path, ids, n: int) -> list[tuple]:
    """n prefills of the cached prompt -> (result, loaded, seconds) each."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        result, loaded = await path.run(command(f"hit-{i}", ids, CACHED))
        out.append((result, loaded, time.perf_counter() - t0))
        engine.release(f"hit-{i}")
    return out


async def test_a_tier_slower_than_computing_is_skipped_with_the_same_first_token():
    settings = Settings(kv_cost_rate_weight=1.0, kv_cost_probe_every=PROBE_EVERY, prefill_step_tokens=1024)
    engine, ids, full, prefix, path = setup(settings, delay_s=0.5)  # a few ms to compute 16 tokens here
    results = await hits(engine, path, ids, 1 + PROBE_EVERY)
    assert all(r.ok and r.token_id == full.token_id for r, _, _ in results)
    # the first hit loads (nothing measured yet) and is slow; then computing wins, until the probe
    used = [r.cached_tokens == CACHED for r, _, _ in results]
    assert used == [True] + [False] * (PROBE_EVERY - 1) + [True] and prefix.loads == 2
    assert all(r.cached_tokens in (0, CACHED) for r, _, _ in results)
    assert max(s for u, (_, _, s) in zip(used, results) if not u) < min(s for u, (_, _, s) in zip(used, results) if u)
    # skipped blocks are still in the store: the prefill does not ask for them to be stored again
    assert all(in_store for _, in_store, _ in results)


async def test_with_the_cost_model_off_every_hit_loads_however_slow():
    engine, ids, full, prefix, path = setup(Settings(kv_cost_model=False), delay_s=0.1)
    results = await hits(engine, path, ids, 3)
    assert [loaded for _, loaded, _ in results] == [True] * 3 and prefix.loads == 3
    assert all(r.token_id == full.token_id and r.cached_tokens == CACHED for r, _, _ in results)
