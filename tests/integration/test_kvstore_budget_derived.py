"""The kvstore's default budget against a real redis-server: a fraction of its maxmemory, of its
host's memory while maxmemory is 0, an explicit setting winning; shown in the stats. Then the
service over NATS: it derives the budget at start and its stats reply carries it."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from services.kvstore.derived_budget import SOURCE_EXPLICIT, SOURCE_MAXMEMORY, SOURCE_SYSTEM_MEMORY
from services.kvstore.main import run
from services.kvstore.service import KVStoreService
from shared.bus import Bus, connect
from shared.kv.client import KVIndexClient
from shared.settings import Settings
from tests.integration.stack import Servers

pytestmark = pytest.mark.integration

MAXMEMORY = 100 * 1024**2
FRACTION, HOST_FRACTION = 0.75, 0.25
START_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """This module's own servers: CONFIG SET maxmemory must not touch anyone else's Redis."""
    s = Servers(tmp_path_factory.mktemp("kv-budget-servers"))
    yield s
    s.stop()


@pytest.fixture
async def redis(servers):
    client = aioredis.Redis(port=servers.redis_port, decode_responses=True)
    yield client
    await client.config_set("maxmemory", 0)
    await client.aclose()


def settings_for(servers: Servers, **overrides) -> Settings:
    return Settings(nats_url=servers.nats_url, redis_url=servers.redis_url, kv_budget_fraction=FRACTION,
                    kv_budget_host_fraction=HOST_FRACTION, **overrides)


async def test_the_budget_follows_maxmemory_and_else_the_host(servers, redis):
    service = KVStoreService(settings_for(servers))
    try:
        await redis.config_set("maxmemory", MAXMEMORY)
        await service.refresh_budget()
        stats = await service.stats()
        assert (stats.budget_bytes, stats.budget_source) == (int(MAXMEMORY * FRACTION), SOURCE_MAXMEMORY)

        # Unlimited: a fraction of the host's memory as Redis reports it; the sweep's refresh sees the change.
        await redis.config_set("maxmemory", 0)
        await service.refresh_budget()
        total = int((await redis.info("memory"))["total_system_memory"])
        stats = await service.stats()
        assert (stats.budget_bytes, stats.budget_source) == (int(total * HOST_FRACTION), SOURCE_SYSTEM_MEMORY)

        # An explicit budget wins over both.
        service.settings = service.settings.model_copy(update={"kv_budget_bytes": 12345})
        await service.refresh_budget()
        stats = await service.stats()
        assert (stats.budget_bytes, stats.budget_source) == (12345, SOURCE_EXPLICIT)
    finally:
        await service.close()


async def test_the_service_derives_it_at_start_and_its_stats_reply_says_so(servers, redis):
    await redis.config_set("maxmemory", MAXMEMORY)
    settings = settings_for(servers, drain_timeout_s=2.0)
    started = asyncio.Event()
    runtime = {}

    async def ready(rt) -> None:
        runtime["rt"] = rt
        started.set()

    task = asyncio.create_task(run(settings, instance="budget-test", ready=ready, install_signals=False))
    await asyncio.wait_for(started.wait(), START_TIMEOUT_S)
    nc = await connect(settings, "kv-budget-test-client")
    try:
        stats = await KVIndexClient(Bus(nc, "test"), settings).stats()
        assert (stats.budget_bytes, stats.budget_source) == (int(MAXMEMORY * FRACTION), SOURCE_MAXMEMORY)
    finally:
        runtime["rt"].stopping.set()
        await asyncio.wait_for(task, START_TIMEOUT_S)
        await nc.close()
