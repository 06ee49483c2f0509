"""`ringserve status` shows each KV tier: a worker's heartbeat carries its device and host tiers'
use (services/worker/tier_use.py), and the scheduler's status reply passes them on per worker."""

from __future__ import annotations

from services.scheduler.registry import Registry
from services.worker.resident_prefix import ResidentPrefix
from services.worker.tier_use import tier_use
from shared.messages import StatusReply, WorkerHeartbeat
from tests.unit.test_host_kv_tier import kept, small_pool
from tests.unit.test_registry import beat

NOW = 100.0


def test_a_heartbeat_carries_the_pool_and_host_tiers():
    pool = small_pool()
    resident, _, _ = kept(pool, 3, host_blocks=8)
    resident.evict(1)  # one block moves to the host tier
    assert tier_use(resident) == {"resident_pages": 2, "resident_bytes": 2 * pool.page_bytes,
                                  "host_tier_bytes": pool.page_bytes, "host_tier_limit_bytes": 8 * pool.page_bytes}
    # no host tier: its fields stay at their defaults; no device tier: nothing at all
    assert tier_use(ResidentPrefix(pool, max_pages=4)) == {"resident_pages": 0, "resident_bytes": 0}
    assert tier_use(None) == {}


def test_the_status_reply_shows_each_workers_tiers_and_old_heartbeats_still_parse():
    tiers = {"resident_pages": 5, "resident_bytes": 5000, "host_tier_bytes": 2000, "host_tier_limit_bytes": 8000}
    reg = Registry(timeout_s=5.0)
    reg.on_worker(beat("w-a").model_copy(update=tiers), now=NOW)
    old = beat("w-b").model_dump()
    for field in tiers:  # a worker of before the tiers: its heartbeat lacks the fields
        old.pop(field)
    reg.on_worker(WorkerHeartbeat.model_validate(old), now=NOW)
    status = reg.status(0, [], 0, now=NOW)
    by_id = {w.worker_id: w for w in status.workers}
    assert {f: getattr(by_id["w-a"], f) for f in tiers} == tiers
    assert {f: getattr(by_id["w-b"], f) for f in tiers} == dict.fromkeys(tiers, 0)
    # the fields travel in the reply (a client of before them ignores them: WorkerStatus ignores extras)
    assert StatusReply.model_validate_json(status.model_dump_json()).workers[0].resident_pages == 5
