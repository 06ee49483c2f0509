"""Eviction through the whole stack: a kvstore with a small budget and one worker, many distinct
prompts whose blocks get stored. Prefix blocks and decode shards together stay within the
budget after every request, old blocks are evicted, a recent prompt still hits and gives what a
run without the cache gave, and a running request's freshly stored blocks stay pinned (and its
shard kept) while other requests push everything else out. Real processes, NATS and Redis."""

import asyncio
import json

import nats
import pytest
import redis.asyncio as aioredis
import torch

from shared.bus import Bus
from shared.checkpoint import model_id
from shared.kv.block import encode_block
from shared.kv.client import KVIndexClient
from shared.kv.keys import block_chain
from shared.kv.quant import quantize_kv
from shared.kv.shards import ShardStore
from shared.settings import Settings
from tests.helpers.checkpoints import save_tiny_checkpoint, tiny_dims
from tests.integration.stack import Stack
from tests.integration.test_ring_equivalence import NEW_TOKENS, hf_greedy

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")

BLOCK = 16
BLOCKS_PER_PROMPT = 4
PROMPT = BLOCKS_PER_PROMPT * BLOCK + 3  # 4 full blocks stored per prompt
PROMPTS = 8
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16  # tiny_dims
PROMPTS_THAT_FIT = 3  # besides the shard of the one request running
WAIT_S = 30.0
LONG_TOKENS = 1950  # within the checkpoint's 2048 positions: runs until cancelled


def _encoded(rows: int) -> int:
    """Bytes of one layer's K/V of `rows` positions as stored (unquantized float32, as on CPU)."""
    zeros = torch.zeros(rows, KV_HEADS, HEAD_DIM)
    return len(encode_block(quantize_kv(zeros, zeros, "none", Settings().kv_group_size)))


BLOCK_BYTES = LAYERS * _encoded(BLOCK)  # all layers of one block
PROMPT_BLOCK_BYTES = BLOCKS_PER_PROMPT * BLOCK_BYTES
PROMPT_SHARD_BYTES = LAYERS * _encoded(PROMPT)  # a request's shard once its prefill is saved
BUDGET = PROMPTS_THAT_FIT * PROMPT_BLOCK_BYTES + PROMPT_SHARD_BYTES


def _ids(salt: int, n: int = PROMPT) -> list[int]:
    return [(i * 31 + salt * 97 + i * i * (salt + 1)) % 290 + 5 for i in range(n)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # No eos: a request runs until max_new_tokens or a cancel.
    cfg = transformers.LlamaConfig(**tiny_dims(max_position_embeddings=2048))
    path = tmp_path_factory.mktemp("tiny-llama-evict")
    return path, save_tiny_checkpoint(cfg, path, seed=11)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, checkpoint):
    path, _ = checkpoint
    stack = Stack(tmp_path_factory.mktemp("evict"), workers=1, services=("fusion", "scheduler", "kvstore"),
                  env={"RINGSERVE_KV_COST_MODEL": "false",  # a hit loads (the cost model would compute)
                       "RINGSERVE_MODEL": str(path), "RINGSERVE_KV_BLOCK_TOKENS": str(BLOCK),
                       "RINGSERVE_KV_BUDGET_BYTES": str(BUDGET)})
    try:
        asyncio.run(stack.wait_ready(1))
        yield stack
    finally:
        stack.stop()


class KV:
    """The kvstore as the test sees it: stats, and lookups of a prompt's blocks."""

    def __init__(self, stack, path):
        self.stack = stack
        self.model = model_id(Settings(model=str(path)))

    async def __aenter__(self):
        self.nc = await nats.connect(self.stack.servers.nats_url)
        self.client = KVIndexClient(Bus(self.nc, "test"), Settings(kv_index_timeout_s=2.0))
        return self

    async def __aexit__(self, *_):
        await self.nc.close()

    async def stats(self):
        stats = await self.client.stats()
        assert stats.error is None, stats.error
        assert stats.budget_bytes == BUDGET
        return stats

    async def stored_blocks(self, ids) -> int:
        return await self.client.lookup(self.model, block_chain(self.model, ids, BLOCK), "none", LAYERS)

    async def redis_bytes(self) -> int:
        """What Redis really holds of block and shard bytes, whatever the kvstore counted."""
        redis = aioredis.from_url(self.stack.servers.redis_url)
        try:
            keys = []
            for pattern in ("ringserve:kv:*", "ringserve:shard:*"):
                keys += [k async for k in redis.scan_iter(match=pattern, _type="string")]
            pipe = redis.pipeline(transaction=False)
            for k in keys:
                pipe.strlen(k)
            return sum(await pipe.execute())
        finally:
            await redis.aclose()

    async def until(self, predicate, what: str):
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while not await predicate():
            assert asyncio.get_running_loop().time() < deadline, f"{what}: {await self.stats()}\n{self.stack.logs()}"
            await asyncio.sleep(0.1)


async def _generate(stack, ids, **fields):
    reply = await stack.generate({"input_ids": ids, "max_new_tokens": NEW_TOKENS, **fields})
    assert "error" not in reply, f"{reply}\n{stack.logs()}"
    return reply


async def test_prefix_blocks_and_shards_stay_within_the_budget_and_recent_prompts_still_hit(stack, checkpoint):
    path, model = checkpoint
    prompts = [_ids(salt) for salt in range(PROMPTS)]
    firsts = []
    async with KV(stack, path) as kv:
        for i, ids in enumerate(prompts):
            reply = await _generate(stack, ids, request_id=f"evict-{i}")
            assert reply["usage"]["cached_tokens"] == 0  # a run without the cache
            firsts.append(reply)
            stats = await kv.stats()
            assert stats.total_bytes <= BUDGET, stats

            async def stored(ids=ids):
                return await kv.stored_blocks(ids) == BLOCKS_PER_PROMPT

            await kv.until(stored, f"prompt {i} stored")  # the worker stores after replying
            stats = await kv.stats()
            assert stats.total_bytes <= BUDGET, stats
            assert await kv.redis_bytes() <= BUDGET

        stats = await kv.stats()
        assert stats.evictions >= PROMPTS * BLOCKS_PER_PROMPT - BUDGET // BLOCK_BYTES > 0, stats
        # (which blocks went depends on the attention mass each drew, too: H2O)

        again = await _generate(stack, prompts[-1])
        assert again["usage"]["cached_tokens"] == BLOCKS_PER_PROMPT * BLOCK
        assert again["output_ids"] == firsts[-1]["output_ids"] == hf_greedy(model, prompts[-1])
        assert (await kv.stats()).total_bytes <= BUDGET


async def test_a_running_requests_new_blocks_and_shard_survive_the_pressure_of_other_requests(stack, checkpoint):
    path, _ = checkpoint
    running_ids = _ids(100)
    rid = "evict-long-running"
    shards = ShardStore(Settings(redis_url=stack.servers.redis_url))
    async with KV(stack, path) as kv:
        await kv.until(lambda: _no_pins(kv), "earlier requests unpinned")
        running = asyncio.create_task(stack.generate({"input_ids": running_ids, "max_new_tokens": LONG_TOKENS,
                                                      "request_id": rid}))
        try:
            # Nothing was cached, so the scheduler pinned nothing: these are the worker's commits.
            async def pinned():
                stats = await kv.stats()
                return stats.pinned_requests == 1 and stats.pinned_blocks == BLOCKS_PER_PROMPT

            await kv.until(pinned, "the running request's blocks pinned")
            for salt in range(200, 200 + PROMPTS_THAT_FIT + 2):  # more than fits
                await _generate(stack, _ids(salt), request_id=f"evict-other-{salt}")
                assert (await kv.stats()).total_bytes <= BUDGET
            await kv.until(lambda: _logged(stack, f"evict-other-{salt}", "kv_prefix_stored"), "the last store done")

            # The running request's shard grows with every few tokens until the budget refuses it.
            async def shard_full():
                return (await kv.stats()).shard_refusals > 0

            await kv.until(shard_full, "the shard refused")
            assert not running.done(), running.result()
            assert await kv.redis_bytes() <= BUDGET
            assert await kv.stored_blocks(running_ids) == BLOCKS_PER_PROMPT
            assert (await shards.load_shard(rid, 0)) is not None
            stats = await kv.stats()
            assert stats.shards >= 1 and stats.total_bytes <= BUDGET
        finally:
            await _cancel(stack, rid)
            reply = await running
            await shards.close()
        assert reply["finish_reason"] == "cancelled", reply

        async def released():
            stats = await kv.stats()
            return (stats.pinned_requests, stats.pinned_blocks, stats.shards, stats.shard_bytes) == (0, 0, 0, 0)

        await kv.until(released, "pins and shard released")


async def _logged(stack, request_id: str, event: str) -> bool:
    log = (stack.workdir / "worker0.log").read_text()
    return any(f'"request_id": "{request_id}"' in line and f'"event": "{event}"' in line for line in log.splitlines())


async def _no_pins(kv) -> bool:
    return (await kv.stats()).pinned_requests == 0


async def _cancel(stack, request_id):
    nc = await nats.connect(stack.servers.nats_url)
    try:
        await nc.request("ringserve.v1.cancel", json.dumps({"request_id": request_id}).encode(), timeout=5)
    finally:
        await nc.close()
