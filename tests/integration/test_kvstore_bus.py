"""The kvstore service's `run()` in-process against real NATS and Redis, driven through the
KVIndexClient that workers and the scheduler use."""

from __future__ import annotations

import asyncio
import json

import msgpack
import pytest
import redis.asyncio as aioredis
import torch

from services.kvstore.main import run
from shared import codec, subjects
from shared.bus import Bus, connect
from shared.kv.client import KVIndexClient
from shared.kv.keys import block_chain
from shared.kv.store import KVBlockStore
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
async def kvstore(servers):
    meta = aioredis.Redis(port=servers.redis_port, db=DB)
    await meta.flushdb()
    settings = Settings(nats_url=servers.nats_url, redis_url=f"redis://127.0.0.1:{servers.redis_port}/{DB}",
                        kv_block_tokens=BLOCK, kv_group_size=BLOCK, heartbeat_interval_s=0.2,
                        kv_index_timeout_s=1.0, drain_timeout_s=2.0)
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
    assert (await client.stats()).error
    await nc.close()
