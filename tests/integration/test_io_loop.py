"""The worker's KV store I/O on an event loop of its own thread: the stores' calls run there
against a real Redis, and a shard save's budget request is called back on the caller's loop
(where the NATS connection lives)."""

import threading

import pytest
import torch

from services.worker.io_loop import IOLoop, IOLoopBlockStore, IOLoopShardStore
from shared.kv.keys import block_chain
from shared.kv.shards import ShardStore
from shared.kv.store import KVBlockStore
from shared.settings import Settings

pytestmark = pytest.mark.integration
LAYERS, HEADS, DIM, BLOCK = 2, 2, 4, 4


@pytest.fixture
async def io_loop():
    io = IOLoop(executor_threads=1)
    yield io
    await io.close()
    assert io.loop.is_closed()


async def test_a_call_runs_on_the_io_loops_thread(io_loop):
    async def where() -> int:
        return threading.get_ident()

    assert await io_loop.run(where()) not in (threading.get_ident(), None)


async def test_shard_saves_ask_the_budget_on_the_callers_loop(servers, io_loop):
    store = IOLoopShardStore(ShardStore(Settings(redis_url=servers.redis_url, kv_shard_ttl_s=60)), io_loop)
    asked: list[tuple[int, int]] = []  # (bytes, thread)
    grant = False

    async def reserve(nbytes: int) -> bool:
        asked.append((nbytes, threading.get_ident()))
        return grant

    rows = [torch.randn(3, HEADS, DIM) for _ in range(LAYERS)]
    try:
        assert not await store.save_increment("req-io", 0, 0, [(0, 3)], rows, rows, reserve=reserve)
        assert await io_loop.run(store.store.load_shard("req-io", 0)) is None  # refused: nothing written
        grant = True
        assert await store.save_increment("req-io", 0, 0, [(0, 3)], rows, rows, reserve=reserve)
        shard = await io_loop.run(store.store.load_shard("req-io", 0))
        assert shard.positions() == [0, 1, 2] and torch.equal(shard.keys[1], rows[1])
        assert len(asked) == 2 and asked[0][0] > 0 and {t for _, t in asked} == {threading.get_ident()}
        assert await store.delete("req-io") > 0
    finally:
        await store.close()


async def test_blocks_go_and_come_back_through_the_io_loop(servers, io_loop):
    store = IOLoopBlockStore(KVBlockStore(Settings(redis_url=servers.redis_url, kv_hot_cache_bytes=0)), io_loop)
    refs = block_chain("io-loop-model", list(range(2 * BLOCK)), BLOCK)
    k = {(layer, ref.index): torch.randn(BLOCK, HEADS, DIM) for layer in range(LAYERS) for ref in refs}
    try:
        items = [(layer, ref, k[layer, ref.index], -k[layer, ref.index]) for layer in range(LAYERS) for ref in refs]
        assert await store.put_blocks(items, "io-loop-model", "none") > 0
        got = await store.get_blocks("io-loop-model", refs, range(LAYERS), "none", torch.float32, "cpu")
        assert set(got) == set(k)
        for slot, (keys, values) in got.items():
            assert torch.equal(keys, k[slot]) and torch.equal(values, -k[slot])
    finally:
        await store.close()
