"""The worker-side block store against a real Redis: round trips, TTLs, corruption, two nodes,
the hot cache, and an unreachable Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from structlog.testing import capture_logs

from shared.kv.block import encode_block
from shared.kv.keys import block_chain
from shared.kv.quant import QUANT_MODES, dequantize_kv, quantize_kv
from shared.kv.ring import HashRing
from shared.kv.store import KVBlockStore
from shared.settings import Settings
from tests.integration.stack import Servers, free_port

pytestmark = pytest.mark.integration


# Redis databases of this file's private redis-server; flushed around each test.
FIRST_DB, SECOND_DB = 1, 2
BLOCK, GROUP, KV_HEADS, HEAD_DIM, LAYERS = 8, 4, 2, 8, 3
MODEL = "test-model"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """This module's own nats-server and redis-server: nothing else shares their data."""
    s = Servers(tmp_path_factory.mktemp("kvstore-servers"))
    yield s
    s.stop()


def _url(servers, db: int) -> str:
    return f"redis://127.0.0.1:{servers.redis_port}/{db}"


def _settings(redis_url: str, **overrides) -> Settings:
    return Settings(redis_url=redis_url, kv_block_tokens=BLOCK, kv_group_size=GROUP, kv_hot_cache_bytes=0,
                    **overrides)


@pytest.fixture
async def dbs(servers):
    clients = [aioredis.Redis(port=servers.redis_port, db=db) for db in (FIRST_DB, SECOND_DB)]
    for c in clients:
        await c.flushdb()
    yield clients
    for c in clients:
        await c.flushdb()
        await c.aclose()


def _kv(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BLOCK, KV_HEADS, HEAD_DIM, generator=g), torch.randn(BLOCK, KV_HEADS, HEAD_DIM, generator=g)


def _items(refs, layers=LAYERS):
    return [(layer, ref, *_kv(layer * 1000 + ref.index)) for layer in range(layers) for ref in refs]


@pytest.mark.parametrize("quant", QUANT_MODES)
async def test_put_then_get_every_mode(servers, dbs, quant):
    store = KVBlockStore(_settings(_url(servers, FIRST_DB)))
    refs = block_chain(MODEL, list(range(3 * BLOCK + 5)), BLOCK)
    items = _items(refs)
    written = await store.put_blocks(items, MODEL, quant)
    assert written == sum(len(encode_block(quantize_kv(k, v, quant, GROUP))) for _, _, k, v in items)
    got = await store.get_blocks(MODEL, refs, range(LAYERS), quant, torch.bfloat16, "cpu")
    assert set(got) == {(layer, ref.index) for layer, ref, _, _ in items}
    for layer, ref, k, v in items:
        want_k, want_v = dequantize_kv(quantize_kv(k, v, quant, GROUP), torch.bfloat16)
        got_k, got_v = got[(layer, ref.index)]
        assert got_k.dtype == torch.bfloat16 and torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    await store.close()


async def test_missing_blocks_are_left_out(servers, dbs):
    store = KVBlockStore(_settings(_url(servers, FIRST_DB)))
    refs = block_chain(MODEL, list(range(4 * BLOCK)), BLOCK)
    await store.put_blocks(_items(refs[:2], layers=1), MODEL, "int8")
    got = await store.get_blocks(MODEL, refs, [0, 1], "int8", torch.float32, "cpu")
    assert set(got) == {(0, 0), (0, 1)}
    assert await store.get_blocks(MODEL, refs, [0], "int4", torch.float32, "cpu") == {}  # other mode, other keys
    await store.close()


async def test_blocks_carry_the_ttl_and_reads_renew_it(servers, dbs):
    ttl = 1000
    store = KVBlockStore(_settings(_url(servers, FIRST_DB), kv_ttl_s=ttl))
    ref = block_chain(MODEL, list(range(BLOCK)), BLOCK)[0]
    await store.put_block(MODEL, 0, ref, *_kv(0), "none")
    key = store.key(MODEL, 0, ref, "none")
    assert 0 < await dbs[0].ttl(key) <= ttl
    await dbs[0].expire(key, 5)
    assert await store.get_blocks(MODEL, [ref], [0], "none", torch.float32, "cpu")
    assert await dbs[0].ttl(key) > ttl - 5
    await store.close()


async def test_corrupt_blocks_are_dropped_and_missed(servers, dbs):
    store = KVBlockStore(_settings(_url(servers, FIRST_DB)))
    refs = block_chain(MODEL, list(range(4 * BLOCK)), BLOCK)
    await store.put_blocks(_items(refs, layers=1), MODEL, "int8")
    keys = [store.key(MODEL, 0, ref, "int8") for ref in refs]
    good = await dbs[0].get(keys[1])
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    await dbs[0].set(keys[0], good[:-3])  # truncated
    await dbs[0].set(keys[2], bytes(flipped))  # bad checksum
    await dbs[0].set(keys[3], b"not a block at all")  # bad header
    with capture_logs() as logs:
        got = await store.get_blocks(MODEL, refs, [0], "int8", torch.float32, "cpu")
    assert set(got) == {(0, 1)}
    assert [await dbs[0].exists(k) for k in keys] == [0, 1, 0, 0]
    assert sum(e["event"] == "kv_block_corrupt" for e in logs) == 3
    await store.close()


async def test_keys_spread_over_two_nodes_by_consistent_hashing(servers, dbs):
    urls = [_url(servers, FIRST_DB), _url(servers, SECOND_DB)]
    store = KVBlockStore(_settings(",".join(urls)))
    refs = block_chain(MODEL, list(range(10 * BLOCK)), BLOCK)
    await store.put_blocks(_items(refs, layers=4), MODEL, "int4")
    ring = HashRing(urls)
    placed = {0: set(), 1: set()}
    for layer in range(4):
        for ref in refs:
            key = store.key(MODEL, layer, ref, "int4")
            placed[ring.node_for(key)].add(key.encode())
    assert placed[0] and placed[1]  # 40 keys: both nodes hold some
    for node, client in enumerate(dbs):
        assert set(await client.keys("ringserve:kv:*")) == placed[node]
    got = await store.get_blocks(MODEL, refs, range(4), "int4", torch.float32, "cpu")
    assert len(got) == 40
    await store.close()


async def test_hot_cache_answers_without_redis(servers, dbs):
    settings = _settings(_url(servers, FIRST_DB)).model_copy(update={"kv_hot_cache_bytes": 1 << 20})
    store = KVBlockStore(settings)
    refs = block_chain(MODEL, list(range(2 * BLOCK)), BLOCK)
    await store.put_blocks(_items(refs, layers=1), MODEL, "int8")
    await dbs[0].flushdb()
    assert len(await store.get_blocks(MODEL, refs, [0], "int8", torch.float32, "cpu")) == 2
    cold = KVBlockStore(_settings(_url(servers, FIRST_DB)))
    assert await cold.get_blocks(MODEL, refs, [0], "int8", torch.float32, "cpu") == {}
    await store.close()
    await cold.close()


async def test_unreachable_redis_means_misses_and_one_log_line():
    settings = _settings(f"redis://127.0.0.1:{free_port()}/0", kv_redis_retry_s=0.05)
    store = KVBlockStore(settings)
    refs = block_chain(MODEL, list(range(2 * BLOCK)), BLOCK)
    with capture_logs() as logs:
        for _ in range(4):
            assert await store.put_blocks(_items(refs), MODEL, "int8") == 0
            assert await store.get_blocks(MODEL, refs, range(LAYERS), "int8", torch.float32, "cpu") == {}
            await asyncio.sleep(0.06)  # past the retry interval: the node is tried again, and fails again
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["kv_redis_unavailable"]
    await store.close()


async def test_metrics_report_bytes_blocks_and_throughput(servers, dbs):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    store = KVBlockStore(_settings(_url(servers, FIRST_DB)), meter=provider.get_meter("test"))
    refs = block_chain(MODEL, list(range(3 * BLOCK)), BLOCK)
    written = await store.put_blocks(_items(refs, layers=1), MODEL, "int8")
    await dbs[0].delete(store.key(MODEL, 0, refs[2], "int8"))
    await store.get_blocks(MODEL, refs, [0], "int8", torch.float32, "cpu")

    data = reader.get_metrics_data()
    points = {m.name: list(m.data.data_points) for rm in data.resource_metrics for sm in rm.scope_metrics
              for m in sm.metrics}
    assert [p.value for p in points["ringserve_kv_store_written_bytes"]] == [written]
    assert [p.value for p in points["ringserve_kv_store_read_bytes"]] == [written * 2 // 3]  # int8 blocks: equal sizes
    blocks = {p.attributes["result"]: p.value for p in points["ringserve_kv_store_blocks_read"]}
    assert blocks["hit"] == 2 and blocks["miss"] == 1 and blocks.get("corrupt", 0) == 0
    node = f"127.0.0.1:{servers.redis_port}/{FIRST_DB}"  # the URL's host:port (and database), no scheme
    assert {p.attributes["node"] for p in points["ringserve_kv_store_blocks_read"]} == {node}
    lookups = {(p.attributes["node"], p.attributes["result"]): p.value for p in points["ringserve_kv_cache_lookups"]}
    assert lookups == {(node, "hit"): 2, (node, "miss"): 1}  # the hot cache is off: not counted
    assert {p.attributes["op"]: p.count for p in points["ringserve_kv_store_throughput_bytes_per_second"]} == {
        "store": 1, "load": 1}
    await store.close()
    provider.shutdown()


async def test_block_reads_count_hits_and_misses_per_redis_node_and_hot_cache(servers, dbs):
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("test")
    urls = [_url(servers, FIRST_DB), _url(servers, SECOND_DB)]
    settings = _settings(",".join(urls)).model_copy(update={"kv_hot_cache_bytes": 1 << 20})
    warm = KVBlockStore(settings, meter=meter, hot_node="hot:w-warm")
    refs = block_chain(MODEL, list(range(10 * BLOCK)), BLOCK)
    await warm.put_blocks(_items(refs, layers=1), MODEL, "int8")
    assert len(await warm.get_blocks(MODEL, refs, [0], "int8", torch.float32, "cpu")) == 10  # all hot
    keys = [warm.key(MODEL, 0, ref, "int8") for ref in refs]
    ring = HashRing(urls)
    await dbs[ring.node_for(keys[3])].delete(keys[3])
    cold = KVBlockStore(settings, meter=meter, hot_node="hot:w-cold")  # an empty hot cache: all from Redis
    assert len(await cold.get_blocks(MODEL, refs, [0], "int8", torch.float32, "cpu")) == 9

    points = {m.name: list(m.data.data_points) for rm in reader.get_metrics_data().resource_metrics
              for sm in rm.scope_metrics for m in sm.metrics}
    lookups = {(p.attributes["node"], p.attributes["result"]): p.value for p in points["ringserve_kv_cache_lookups"]}
    labels = [f"127.0.0.1:{servers.redis_port}/{db}" for db in (FIRST_DB, SECOND_DB)]
    want = {("hot:w-warm", "hit"): 10, ("hot:w-cold", "miss"): 10}
    for node, label in enumerate(labels):
        asked = sum(ring.node_for(k) == node for k in keys)
        missed = int(ring.node_for(keys[3]) == node)
        want.update({(label, "hit"): asked - missed, (label, "miss"): missed})
    assert lookups == {k: v for k, v in want.items() if v}
    hot = {p.attributes["node"]: p.value for p in points["ringserve_kv_store_blocks_read"]
           if p.attributes["result"] == "hot"}
    assert hot == {"hot:w-warm": 10, "hot:w-cold": 0}
    assert not any("redis://" in node for node, _ in lookups)
    await warm.close()
    await cold.close()
    provider.shutdown()
