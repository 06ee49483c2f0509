"""The kvstore service's logic against a real Redis, called directly (no NATS): prefix lookup,
commits, the budget under a stream of commits, pins, importance, tail-first eviction, TTLs and
their renewal, pins of committed blocks, decode shards in the budget."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
import torch
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.kvstore.keyspace import ACCESS, BYTES, PINNED_REQUESTS, member, pins_key
from services.kvstore.service import KVStoreService
from services.kvstore.shards import SHARD_GRACE_S
from shared.kv.keys import BlockRef, block_chain
from shared.kv.messages import (
    KVCommitBlock,
    KVCommitRequest,
    KVLookupRequest,
    KVPinRequest,
    KVShardRequest,
    KVTouch,
    KVTouchRequest,
)
from shared.kv.store import KVBlockStore
from shared.settings import Settings
from tests.integration.stack import Servers

pytestmark = pytest.mark.integration


DB = 3  # of this module's private redis-server; flushed around each test
BLOCK, LAYERS, QUANT, MODEL = 4, 2, "int8", "test-model"
TTL_S = 100


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """This module's own nats-server and redis-server: nothing else shares their data."""
    s = Servers(tmp_path_factory.mktemp("kvstore-servers"))
    yield s
    s.stop()


class Clock:
    def __init__(self, now: float = 1_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def env(servers):
    meta = aioredis.Redis(port=servers.redis_port, db=DB, decode_responses=True)
    await meta.flushdb()
    settings = Settings(redis_url=f"redis://127.0.0.1:{servers.redis_port}/{DB}", kv_block_tokens=BLOCK,
                        kv_group_size=BLOCK, kv_hot_cache_bytes=0, kv_ttl_s=TTL_S, kv_importance_weight_s=60.0)
    clock = Clock()
    service = KVStoreService(settings, clock=clock)
    store = KVBlockStore(settings)
    yield service, store, clock, meta
    await service.close()
    await store.close()
    await meta.flushdb()
    await meta.aclose()


def chain(seed: int, blocks: int) -> list[BlockRef]:
    return block_chain(MODEL, [seed * 10_000 + i for i in range(blocks * BLOCK)], BLOCK)


def shared_prefix_chain(prefix_seed: int, prefix_blocks: int, seed: int, blocks: int) -> list[BlockRef]:
    ids = [prefix_seed * 10_000 + i for i in range(prefix_blocks * BLOCK)]
    ids += [seed * 10_000 + i for i in range((blocks - prefix_blocks) * BLOCK)]
    return block_chain(MODEL, ids, BLOCK)


async def put_and_commit(service, store, refs, request_id=None) -> int:
    """What a worker does: write every layer of the blocks to Redis, then commit them."""
    items = [(layer, ref, torch.randn(BLOCK, 1, 8), torch.randn(BLOCK, 1, 8))
             for layer in range(LAYERS) for ref in refs]
    nbytes = await store.put_blocks(items, MODEL, QUANT)
    blocks = [KVCommitBlock(index=r.index, chain_hash=r.chain_hash, parent_hash=r.parent_hash) for r in refs]
    await service.commit(KVCommitRequest(model_id=MODEL, quant=QUANT, num_layers=LAYERS, blocks=blocks,
                                         nbytes=nbytes, request_id=request_id))
    return nbytes


async def lookup(service, refs, num_layers=LAYERS, quant=QUANT) -> int:
    reply = await service.lookup(KVLookupRequest(model_id=MODEL, quant=quant, num_layers=num_layers,
                                                 hashes=[r.chain_hash for r in refs]))
    return reply.blocks


async def stored(meta, refs) -> list[bool]:
    return [bool(await meta.hexists(BYTES, member(QUANT, r.chain_hash))) for r in refs]


async def test_lookup_counts_leading_stored_blocks(env):
    service, store, _, _ = env
    a = chain(1, 5)
    await put_and_commit(service, store, a)
    assert await lookup(service, a) == 5
    assert await lookup(service, shared_prefix_chain(1, 2, 2, 6)) == 2  # same first 2 blocks, then different
    assert await lookup(service, chain(3, 3)) == 0
    assert await lookup(service, a, num_layers=LAYERS + 1) == 0  # not stored for every layer asked for
    assert await lookup(service, a, quant="int4") == 0
    stats = await service.stats()
    assert (stats.hits, stats.misses) == (5 + 2, 4 + 3 + 5 + 5)
    assert stats.hit_rate == pytest.approx(7 / 24)


async def test_a_block_whose_bytes_are_gone_is_no_longer_claimed(env):
    service, store, _, meta = env
    a = chain(1, 4)
    await put_and_commit(service, store, a)
    await meta.delete(store.key(MODEL, 1, a[2], QUANT))  # one layer of block 2 lost (e.g. Redis restarted)
    assert await lookup(service, a) == 2
    assert await stored(meta, a) == [True, True, False, True]
    assert (await service.stats()).lost == 1


async def test_committing_twice_counts_once(env):
    service, store, _, _ = env
    a = chain(1, 3)
    nbytes = await put_and_commit(service, store, a)
    await put_and_commit(service, store, a)
    stats = await service.stats()
    assert (stats.blocks, stats.bytes_stored) == (3, nbytes)
    assert stats.bytes_by_quant == {QUANT: nbytes} and stats.blocks_by_quant == {QUANT: 3}


async def test_budget_holds_under_a_stream_of_commits_and_pins_are_respected(env):
    service, store, clock, meta = env
    block_bytes = await put_and_commit(service, store, chain(0, 1))
    service.settings = service.settings.model_copy(update={"kv_budget_bytes": 6 * block_bytes})
    pinned = chain(1, 3)
    await put_and_commit(service, store, pinned, request_id="in-flight")
    for seed in range(2, 22):
        clock.now += 1
        await put_and_commit(service, store, chain(seed, 2))
        stats = await service.stats()
        assert stats.bytes_stored <= 6 * block_bytes
        assert await stored(meta, pinned) == [True] * 3  # the oldest blocks, but pinned
    assert stats.evictions >= 20 * 2 + 1 - 3
    assert stats.pinned_blocks == 3 and stats.pinned_requests == 1

    await service.pin(KVPinRequest(request_id="in-flight", action="unpin"))
    for seed in range(30, 33):
        clock.now += 1
        await put_and_commit(service, store, chain(seed, 2))
    assert await stored(meta, pinned) == [False] * 3  # once released they age out like the rest
    assert (await service.stats()).bytes_stored <= 6 * block_bytes


@pytest.mark.parametrize("important", [0, 1])
async def test_important_blocks_outlive_unimportant_ones_of_the_same_age(env, important):
    service, store, clock, meta = env
    x, y = chain(1, 1), chain(2, 1)
    block_bytes = await put_and_commit(service, store, x)
    await put_and_commit(service, store, y)  # same clock: same age
    touched = (x, y)[important]
    await service.touch(KVTouchRequest(model_id=MODEL, quant=QUANT,
                                       touches=[KVTouch(chain_hash=touched[0].chain_hash, importance=0.5)]))
    service.settings = service.settings.model_copy(update={"kv_budget_bytes": 2 * block_bytes})
    clock.now += 1
    z = chain(3, 1)
    await put_and_commit(service, store, z)
    assert await stored(meta, x + y + z) == [important == 0, important == 1, True]


async def test_chains_are_evicted_from_their_tail(env):
    service, store, clock, meta = env
    a, b = chain(1, 4), chain(2, 4)
    block_bytes = await put_and_commit(service, store, a) // len(a)  # int8 blocks of one shape: equal sizes
    clock.now += 1
    await put_and_commit(service, store, b)
    # Without the tail-first rule, a[0] (same age as a[3]) could go first and strand a[1:].
    service.settings = service.settings.model_copy(update={"kv_budget_bytes": 5 * block_bytes})
    await service.evict_to_budget()
    assert await stored(meta, a) == [True, False, False, False]
    assert await stored(meta, b) == [True] * 4
    assert await lookup(service, a) == 1


async def test_blocks_past_their_ttl_are_swept_unless_pinned(env):
    service, store, clock, meta = env
    a, b = chain(1, 2), chain(2, 2)
    await put_and_commit(service, store, a)
    await put_and_commit(service, store, b)
    clock.now += TTL_S - 1
    assert await service.sweep_expired() == 0
    await service.pin(KVPinRequest(request_id="r", model_id=MODEL, quant=QUANT, hashes=[r.chain_hash for r in b]))
    clock.now += 2
    assert await service.sweep_expired() == 2
    assert await stored(meta, a + b) == [False, False, True, True]
    assert not await meta.exists(store.key(MODEL, 0, a[0], QUANT))  # the bytes went with the metadata
    assert (await service.stats()).expired == 2


def _collect(reader: InMemoryMetricReader) -> dict[str, list]:
    """Metric name -> its data points, collected now."""
    data = reader.get_metrics_data()
    return {
        metric.name: list(metric.data.data_points)
        for resource_metrics in (data.resource_metrics if data else [])
        for scope in resource_metrics.scope_metrics
        for metric in scope.metrics
    }


async def test_metrics_report_lookups_evictions_and_what_is_stored(env):
    plain_service, store, clock, _ = env
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    service = KVStoreService(plain_service.settings, meter=provider.get_meter("test"), clock=clock)
    a = chain(1, 3)
    nbytes = await put_and_commit(service, store, a)
    assert await lookup(service, a + chain(2, 1)) == 3  # 3 hits, 1 miss
    service.settings = service.settings.model_copy(update={"kv_budget_bytes": nbytes // 3})
    assert await service.evict_to_budget() == 2
    await service.stats()

    points = _collect(reader)
    lookups = {p.attributes["result"]: p.value for p in points["ringserve_kv_cache_lookups"]}
    assert lookups == {"hit": 3, "miss": 1}
    assert [(p.attributes, p.value) for p in points["ringserve_kv_evictions"]] == [({"reason": "budget"}, 2)]
    assert [(p.attributes, p.value) for p in points["ringserve_kv_stored_bytes"]] == [({"quant": QUANT}, nbytes // 3)]
    assert [(p.attributes, p.value) for p in points["ringserve_kv_stored_blocks"]] == [({"quant": QUANT}, 1)]
    assert [p.value for p in points["ringserve_kv_hit_ratio"]] == [0.75]
    await service.close()
    provider.shutdown()


# ---- TTL renewal, pins of committed blocks, shards in the budget ----------------------------------


def layer_keys(store, refs) -> list[str]:
    return [store.key(MODEL, layer, ref, QUANT) for ref in refs for layer in range(LAYERS)]


async def ttls(meta, keys) -> list[int]:
    return [await meta.ttl(k) for k in keys]


async def shorten_ttls(meta, keys, seconds=5) -> None:
    for k in keys:
        await meta.expire(k, seconds)


async def test_a_lookup_renews_the_ttl_of_every_layer_of_the_blocks_it_finds(env):
    service, store, _, meta = env
    a = chain(1, 3)
    await put_and_commit(service, store, a)
    await shorten_ttls(meta, layer_keys(store, a))  # as if stored long ago and only ever served hot since
    assert await lookup(service, a[:2]) == 2
    assert all(t > TTL_S - 5 for t in await ttls(meta, layer_keys(store, a[:2])))
    assert all(0 < t <= 5 for t in await ttls(meta, layer_keys(store, a[2:])))  # not looked up: not renewed


async def test_a_pin_and_a_touch_renew_the_blocks_they_name_and_pins_never_outlive_the_bytes(env):
    service, store, clock, meta = env
    a, b = chain(1, 2), chain(2, 2)
    await put_and_commit(service, store, a + b)
    await shorten_ttls(meta, layer_keys(store, a + b))
    clock.now += 10
    await service.pin(KVPinRequest(request_id="r", model_id=MODEL, quant=QUANT, hashes=[r.chain_hash for r in a]))
    assert all(t > TTL_S - 5 for t in await ttls(meta, layer_keys(store, a)))
    await service.touch(KVTouchRequest(model_id=MODEL, quant=QUANT, touches=[KVTouch(chain_hash=b[0].chain_hash)]))
    assert all(t > TTL_S - 5 for t in await ttls(meta, layer_keys(store, b[:1])))
    assert all(0 < t <= 5 for t in await ttls(meta, layer_keys(store, b[1:])))

    # A later pin of the same request does not stretch the pin past the bytes it renewed before.
    pin_ttl = await meta.ttl(pins_key("r"))
    first_pinned = await meta.zscore(PINNED_REQUESTS, "r")
    clock.now += 50
    await service.pin(KVPinRequest(request_id="r", model_id=MODEL, quant=QUANT, hashes=[b[0].chain_hash]))
    assert await meta.zscore(PINNED_REQUESTS, "r") == first_pinned
    assert 0 < await meta.ttl(pins_key("r")) <= pin_ttl <= min(await ttls(meta, layer_keys(store, a + b[:1])))


async def test_committed_blocks_are_pinned_to_their_request_until_it_unpins_and_never_after(env):
    service, store, clock, meta = env
    block_bytes = await put_and_commit(service, store, chain(0, 1))
    service.settings = service.settings.model_copy(update={"kv_budget_bytes": 3 * block_bytes})
    mine = chain(1, 2)
    await put_and_commit(service, store, mine, request_id="running")  # computed by a running request
    stats = await service.stats()
    assert (stats.pinned_requests, stats.pinned_blocks) == (1, 2)
    for seed in range(2, 6):  # newer blocks push everything else out, but not what is pinned
        clock.now += 1
        await put_and_commit(service, store, chain(seed, 1))
        assert await stored(meta, mine) == [True, True]
    await meta.zadd(ACCESS, {member(QUANT, r.chain_hash): 0 for r in mine})  # as if unused for long
    assert await service.sweep_expired() == 0  # pinned blocks are never swept
    assert await stored(meta, mine) == [True, True]

    await service.pin(KVPinRequest(request_id="running", action="unpin"))
    assert await service.sweep_expired() == 2
    # A commit of the request that was sent before its end but arrives after the unpin pins nothing.
    await put_and_commit(service, store, chain(9, 1), request_id="running")
    stats = await service.stats()
    assert (stats.pinned_requests, stats.pinned_blocks) == (0, 0)
    assert not await meta.exists(pins_key("running"))


async def test_shards_count_against_the_budget_evict_blocks_and_are_refused_when_nothing_can_go(env):
    service, store, clock, meta = env
    block_bytes = await put_and_commit(service, store, chain(0, 1))
    budget = 4 * block_bytes
    service.settings = service.settings.model_copy(update={"kv_budget_bytes": budget})

    async def total() -> int:
        stats = await service.stats()
        assert stats.total_bytes == stats.bytes_stored + stats.shard_bytes <= budget
        return stats.total_bytes

    clock.now += 1
    await put_and_commit(service, store, chain(1, 2))
    pinned = chain(2, 1)
    await put_and_commit(service, store, pinned, request_id="in-flight")
    assert await total() == 4 * block_bytes

    # Room for a shard increment is made by evicting the least recently used unpinned blocks.
    reply = await service.shard(KVShardRequest(request_id="in-flight", member=0, nbytes=block_bytes + 1))
    assert reply.granted and await total() <= budget
    assert await stored(meta, chain(0, 1) + chain(1, 2)) == [False, True, False]  # chain(1) loses its tail
    stats = await service.stats()
    assert (stats.shards, stats.shard_bytes, stats.evictions) == (1, block_bytes + 1, 2)

    # Shards are never evicted: once only pinned blocks and shards are left, more is refused...
    assert (await service.shard(KVShardRequest(request_id="other", member=1, nbytes=2 * block_bytes - 1))).granted
    assert not (await service.shard(KVShardRequest(request_id="other", member=1, nbytes=block_bytes))).granted
    assert await stored(meta, pinned) == [True]
    # ... and so are committed blocks that do not fit: their bytes are deleted, nothing is claimed.
    late = chain(3, 2)
    await put_and_commit(service, store, late)
    assert await stored(meta, late) == [False, False] and not await meta.exists(store.key(MODEL, 0, late[0], QUANT))
    assert await lookup(service, late) == 0
    stats = await service.stats()
    assert (stats.shard_refusals, stats.rejected) == (1, 2) and await total() <= budget

    # Released shards give their room back; a dead worker's are forgotten after their keys expired.
    await service.shard(KVShardRequest(request_id="other", member=1, action="release"))
    assert (await service.stats()).shard_bytes == block_bytes + 1
    clock.now += service.settings.kv_shard_ttl_s + SHARD_GRACE_S + 1
    assert await service.forget_stale_shards() == 1
    stats = await service.stats()
    assert (stats.shards, stats.shard_bytes) == (0, 0)
    await put_and_commit(service, store, late)
    assert await stored(meta, late) == [True, True] and await total() <= budget
