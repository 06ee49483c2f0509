"""The kvstore service's `run()` in-process against real NATS and Redis, driven through the
KVIndexClient that workers and the scheduler use (and the scheduler's PrefixIndex and the
worker's ShardPersister on top of it)."""

from __future__ import annotations

import asyncio
import json

import msgpack
import pytest
import redis.asyncio as aioredis
import torch
from opentelemetry import trace

from services.kvstore.main import run
from services.scheduler.prefix import PrefixIndex
from services.worker.kv_cache import KVPool, RequestKV
from services.worker.shard_persist import ShardPersister
from shared import codec, subjects
from shared.bus import Bus, connect
from shared.kv.client import KVIndexClient
from shared.kv.keys import block_chain
from shared.kv.shards import ShardStore, blob_key
from shared.kv.store import KVBlockStore
from shared.messages import ModelInfo
from shared.settings import Settings
from tests.integration.stack import Servers

pytestmark = pytest.mark.integration


DB = 4  # of this module's private redis-server; flushed around each test
BLOCK, LAYERS, QUANT, MODEL, INSTANCE = 4, 2, "int4", "bus-model", "kvstore-test"
READY_TIMEOUT_S = 15


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """This module's own nats-server and redis-server: nothing else shares their data."""
    s = Servers(tmp_path_factory.mktemp("kvstore-servers"))
    yield s
    s.stop()


@pytest.fixture
async def kvstore(servers, request):
    meta = aioredis.Redis(port=servers.redis_port, db=DB)
    await meta.flushdb()
    settings = Settings(nats_url=servers.nats_url, redis_url=f"redis://127.0.0.1:{servers.redis_port}/{DB}",
                        kv_block_tokens=BLOCK, kv_group_size=BLOCK, heartbeat_interval_s=0.2,
                        kv_index_timeout_s=1.0, drain_timeout_s=2.0, **getattr(request, "param", {}))
    started = asyncio.Event()
    runtime = {}

    async def ready(rt) -> None:
        runtime["rt"] = rt
        started.set()

    task = asyncio.create_task(run(settings, instance=INSTANCE, ready=ready, install_signals=False))
    await asyncio.wait_for(started.wait(), READY_TIMEOUT_S)
    nc = await connect(settings, "kvstore-test-client")
    yield settings, nc, task
    runtime["rt"].stopping.set()
    await asyncio.wait_for(task, READY_TIMEOUT_S)
    await nc.close()
    await meta.flushdb()
    await meta.aclose()


async def test_lookup_commit_touch_pin_stats_over_the_bus(kvstore):
    settings, nc, _ = kvstore
    client = KVIndexClient(Bus(nc, "test"), settings)
    store = KVBlockStore(settings)
    refs = block_chain(MODEL, list(range(3 * BLOCK + 1)), BLOCK)
    assert await client.lookup(MODEL, refs, QUANT, LAYERS) == 0

    items = [(layer, ref, torch.randn(BLOCK, 2, 8), torch.randn(BLOCK, 2, 8))
             for layer in range(LAYERS) for ref in refs]
    nbytes = await store.put_blocks(items, MODEL, QUANT)
    await client.commit(MODEL, refs, QUANT, LAYERS, nbytes, request_id="req-1")
    assert await client.lookup(MODEL, refs, QUANT, LAYERS) == 3
    assert await client.lookup(MODEL, refs[:2], QUANT, LAYERS) == 2

    await client.touch(MODEL, [(refs[0].chain_hash, 0.7), (refs[1].chain_hash, 0.1)], QUANT)
    await client.pin("req-2", MODEL, [refs[0].chain_hash], QUANT)
    stats = await client.stats()
    assert stats.error is None
    assert (stats.blocks, stats.bytes_stored, stats.bytes_by_quant) == (3, nbytes, {QUANT: nbytes})
    assert (stats.hits, stats.misses, stats.pinned_requests, stats.pinned_blocks) == (5, 3, 2, 3)

    await client.unpin("req-1")
    await client.unpin("req-2")
    stats = await client.stats()
    assert (stats.pinned_requests, stats.pinned_blocks) == (0, 0)
    await store.close()


async def test_malformed_messages_get_an_error_reply_and_the_service_keeps_serving(kvstore):
    settings, nc, _ = kvstore
    bad_bodies = [
        b"\xc1 not msgpack",
        msgpack.packb([1, 2, 3]),
        codec.pack({"model_id": "", "quant": "int9", "num_layers": 0, "hashes": ["zz"]}),
    ]
    for body in bad_bodies:
        reply = codec.unpack((await nc.request(subjects.KV_LOOKUP, body, timeout=2)).data)
        assert reply["error"].startswith("invalid KVLookupRequest")
    reply = codec.unpack((await nc.request(subjects.KV_TOUCH, codec.pack({"model_id": "m", "quant": "none",
                          "touches": [{"chain_hash": "0" * 32, "importance": -1.0}]}), timeout=2)).data)
    assert "invalid KVTouchRequest" in reply["error"]
    client = KVIndexClient(Bus(nc, "test"), settings)
    assert (await client.stats()).error is None  # still serving


async def test_registered_with_nats_micro_and_sends_heartbeats(kvstore):
    _, nc, _ = kvstore
    beats = await nc.subscribe(subjects.heartbeat("kvstore", INSTANCE))
    beat = codec.unpack((await beats.next_msg(timeout=2)).data)
    assert beat["service"] == "kvstore" and beat["instance"] == INSTANCE
    info = json.loads((await nc.request("$SRV.INFO.ringserve-kvstore", b"", timeout=2)).data)
    assert info["name"] == "ringserve-kvstore" and info["metadata"]["instance"] == INSTANCE


async def test_client_without_a_kvstore_finds_nothing_and_does_not_raise(servers):
    settings = Settings(nats_url=servers.nats_url, kv_index_timeout_s=0.2)
    nc = await connect(settings, "lonely-client")
    client = KVIndexClient(Bus(nc, "test"), settings)
    refs = block_chain(MODEL, list(range(2 * BLOCK)), BLOCK)
    assert await client.lookup(MODEL, refs, QUANT, LAYERS) == 0
    await client.commit(MODEL, refs, QUANT, LAYERS, 10, "r")
    await client.touch(MODEL, [(refs[0].chain_hash, 1.0)], QUANT)
    assert not await client.reserve_shard("r", 0, 10)  # no shard is written that nobody accounts for
    assert (await client.stats()).error
    await nc.close()


async def test_a_request_unpins_the_blocks_its_workers_committed_even_when_nothing_was_cached(kvstore):
    settings, nc, _ = kvstore
    client = KVIndexClient(Bus(nc, "test"), settings)
    store = KVBlockStore(settings)
    index = PrefixIndex(client, settings, trace.get_tracer("test"))
    model = ModelInfo(name=MODEL, vocab_size=1000, num_layers=LAYERS, num_kv_heads=2, head_dim=8,
                      max_position_embeddings=1024, dtype="float32")
    ids = list(range(3 * BLOCK + 1))
    async with index.hold("req-new", model, ids, QUANT) as hit:
        assert hit.cached_tokens == 0 and len(hit.blocks) == 3
        # what a worker does after the prefill, while the request runs
        items = [(layer, ref, torch.randn(BLOCK, 2, 8), torch.randn(BLOCK, 2, 8))
                 for layer in range(LAYERS) for ref in hit.blocks]
        nbytes = await store.put_blocks(items, MODEL, QUANT)
        await client.commit(MODEL, hit.blocks, QUANT, LAYERS, nbytes, request_id="req-new")
        stats = await client.stats()
        assert (stats.pinned_requests, stats.pinned_blocks) == (1, 3)
    stats = await client.stats()
    assert (stats.pinned_requests, stats.pinned_blocks, stats.blocks) == (0, 0, 3)
    await store.close()


def _request_kv(rows: int) -> RequestKV:
    pool = KVPool(LAYERS, kv_heads=2, head_dim=8, page_tokens=4, pages=1, dtype=torch.float32,
                  device=torch.device("cpu"), growable=True)
    kv = RequestKV("req-s", 0, pool)
    kv.extend([torch.randn(rows, 2, 8) for _ in range(LAYERS)], [torch.randn(rows, 2, 8) for _ in range(LAYERS)])
    kv.note_positions(0, rows)
    return kv


async def _until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)


async def test_a_shard_is_written_into_room_reserved_in_the_budget_and_gives_it_back(kvstore, servers):
    settings, nc, _ = kvstore
    client = KVIndexClient(Bus(nc, "test"), settings)
    persister = ShardPersister(ShardStore(settings), every_tokens=BLOCK, budget=client)
    shards = ShardStore(settings)
    meta = aioredis.Redis(port=servers.redis_port, db=DB)
    try:
        persister.track("req-s", 0, _request_kv(10))

        async def saved() -> bool:
            return await shards.load_shard("req-s", 0) is not None

        await _until(saved)
        written = sum([await meta.strlen(blob_key("req-s", 0, layer, 0)) for layer in range(LAYERS)])
        assert (await client.stats()).shard_bytes == written > 0
        persister.forget("req-s")
        await _until(lambda: _shard_bytes(client, lambda n: n == 0))
        assert await meta.keys("ringserve:shard:*") == []
    finally:
        await persister.close()
        await shards.close()
        await meta.aclose()


class _FirstWriteFails(ShardStore):
    """Redis takes the first increment's room reservation, then the write itself fails."""

    failed = False

    async def save_increment(self, *args, reserve=None, **kwargs) -> bool:
        if not self.failed:
            self.failed = True
            async def reserve_then_fail(nbytes: int) -> bool:
                return await reserve(nbytes) and False
            return await super().save_increment(*args, reserve=reserve_then_fail, **kwargs)
        return await super().save_increment(*args, reserve=reserve, **kwargs)


async def test_room_granted_for_a_failed_write_is_used_by_the_retry_not_reserved_twice(kvstore, servers):
    settings, nc, _ = kvstore
    client = KVIndexClient(Bus(nc, "test"), settings)
    store = _FirstWriteFails(settings)
    persister = ShardPersister(store, every_tokens=BLOCK, budget=client)
    shards = ShardStore(settings)
    meta = aioredis.Redis(port=servers.redis_port, db=DB)
    try:
        persister.track("req-s", 0, _request_kv(10))
        await _until(lambda: _shard_bytes(client, lambda n: n > 0))  # granted, not written
        assert store.failed and await shards.load_shard("req-s", 0) is None
        persister.grew("req-s")  # the next save retries the same rows

        async def saved() -> bool:
            return await shards.load_shard("req-s", 0) is not None

        await _until(saved)
        written = sum([await meta.strlen(blob_key("req-s", 0, layer, 0)) for layer in range(LAYERS)])
        assert (await client.stats()).shard_bytes == written
    finally:
        await persister.close()
        await shards.close()
        await meta.aclose()


@pytest.mark.parametrize("kvstore", [{"kv_budget_bytes": 100}], indirect=True)
async def test_a_shard_increment_without_room_in_the_budget_is_not_written(kvstore, servers):
    settings, nc, _ = kvstore
    client = KVIndexClient(Bus(nc, "test"), settings)
    persister = ShardPersister(ShardStore(settings), every_tokens=BLOCK, budget=client)
    meta = aioredis.Redis(port=servers.redis_port, db=DB)
    try:
        persister.track("req-s", 0, _request_kv(10))  # 10 rows of 2 layers: well over 100 bytes
        await _until(lambda: _refusals(client))
        stats = await client.stats()
        assert (stats.shards, stats.shard_bytes) == (0, 0)
        assert await meta.keys("ringserve:shard:*") == []
    finally:
        await persister.close()
        await meta.aclose()


async def _shard_bytes(client, ok) -> bool:
    return ok((await client.stats()).shard_bytes)


async def _refusals(client) -> bool:
    return (await client.stats()).shard_refusals > 0
