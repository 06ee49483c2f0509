"""Decode KV shards persisted to Redis while a request runs: what another worker would load to
restore it. The loaded rows must be the K/V a fresh model computes at those positions."""

import asyncio
import json

import nats
import pytest
import redis.asyncio as aioredis
import torch

from shared.kv.shards import ShardStore, members_key
from shared.model.loader import load_model
from shared.settings import Settings
from services.worker.kv_cache import KVPool, RequestKV
from services.worker.shard_persist import ShardPersister
from tests.helpers.checkpoints import causal_attention, save_tiny_checkpoint, tiny_dims
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")

BLOCK = 16  # a shard is saved every BLOCK decode tokens a member appends
CHUNK = 24
PROMPT = 40  # two chunks: a ring of two, in 4 zigzag units of 10 (CHUNK is not a block multiple: no rounding)
OWN = [list(range(0, 10)) + list(range(30, 40)), list(range(10, 30))]  # each member's prompt positions, row order
DECODED_BEFORE_LOAD = 3 * BLOCK  # both members have saved decode increments by then
WAIT_S = 60.0
TOLERANCE = 1e-4


def _ids(n):
    return [(i * 53 + 11) % 290 + 5 for i in range(n)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # No eos: generation runs until cancelled. Positions enough for a long decode.
    cfg = transformers.LlamaConfig(**tiny_dims(max_position_embeddings=2048))
    path = tmp_path_factory.mktemp("tiny-llama-shards")
    save_tiny_checkpoint(cfg, path, seed=5)
    return path


def reference_kv(model, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer k, v [len(ids), kv_heads, head_dim] of the whole sequence, computed at once."""
    positions = torch.arange(len(ids))
    with torch.inference_mode():
        cos, sin = model.rope(positions, len(ids))
        h = model.embed(torch.tensor(ids))
        keys, values = [], []
        for layer in model.layers:
            q, k, v = layer.qkv(h, cos, sin)
            keys.append(k)
            values.append(v)
            h = layer.finish(h, causal_attention(q, k, v, model.attn_scale, q_start=0))
    return keys, values


async def _cancel(stack, request_id):
    nc = await nats.connect(stack.servers.nats_url)
    try:
        await nc.request("ringserve.v1.cancel", json.dumps({"request_id": request_id}).encode(), timeout=5)
    finally:
        await nc.close()


async def test_a_running_requests_shards_load_as_the_kv_of_their_positions(tmp_path_factory, checkpoint):
    stack = Stack(tmp_path_factory.mktemp("shards"), workers=2, services=("fusion", "scheduler", "kvstore"),
                  env={"RINGSERVE_MODEL": str(checkpoint), "RINGSERVE_KV_BLOCK_TOKENS": str(BLOCK),
                       "RINGSERVE_CHUNK_TOKENS": str(CHUNK)})
    shards = ShardStore(Settings(redis_url=stack.servers.redis_url))
    try:
        await stack.wait_ready(2)
        rid, prompt = "shard-restore-1", _ids(PROMPT)
        running = asyncio.create_task(stack.generate({"input_ids": prompt, "max_new_tokens": 1500, "request_id": rid}))

        deadline = asyncio.get_running_loop().time() + WAIT_S
        while True:
            loaded = [await shards.load_shard(rid, member) for member in range(2)]
            if all(s is not None for s in loaded) and sum(s.tokens for s in loaded) >= PROMPT + DECODED_BEFORE_LOAD:
                break
            assert not running.done(), running.result()
            assert asyncio.get_running_loop().time() < deadline, f"shards: {loaded}\n{stack.logs()}"
            await asyncio.sleep(0.1)
        await _cancel(stack, rid)
        reply = await running
        assert reply["finish_reason"] == "cancelled", reply

        # The members' shards split the prompt as the ring did, then take turns on decode tokens
        # (each member saves on its own schedule, so one may be a few tokens behind the other).
        positions = [s.positions() for s in loaded]
        assert [p[: len(own)] for p, own in zip(positions, OWN)] == OWN
        assert all(len(p) > len(own) for p, own in zip(positions, OWN))
        held = positions[0] + positions[1]
        assert len(set(held)) == len(held), "no position in both shards"
        assert max(held) < PROMPT + len(reply["output_ids"])

        # Token at position PROMPT + j is output j (fed back at decode step j).
        sequence = prompt + reply["output_ids"][: max(held) + 1 - PROMPT]
        keys, values = reference_kv(load_model(checkpoint), sequence)
        for shard, member_positions in zip(loaded, positions):
            rows = torch.tensor(member_positions)
            assert len(shard.keys) == len(keys)
            for layer, (k, v) in enumerate(zip(keys, values)):
                torch.testing.assert_close(shard.keys[layer], k[rows], atol=TOLERANCE, rtol=TOLERANCE,
                                           msg=f"keys of layer {layer}")
                torch.testing.assert_close(shard.values[layer], v[rows], atol=TOLERANCE, rtol=TOLERANCE,
                                           msg=f"values of layer {layer}")

        # Released: each member deletes its shard.
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while any([await shards.load_shard(rid, member) for member in range(2)]):
            assert asyncio.get_running_loop().time() < deadline, stack.logs()
            await asyncio.sleep(0.1)
    finally:
        await shards.close()
        stack.stop()


async def test_shard_increments_load_back_in_order_and_a_lost_blob_loads_nothing(servers):
    settings = Settings(redis_url=servers.redis_url, kv_shard_ttl_s=60)
    store = ShardStore(settings)
    g = torch.Generator().manual_seed(0)
    layers, heads, dim = 3, 2, 4
    increments = [([(0, 5), (9, 12)], 8), ([(12, 13)], 1), ([(14, 16)], 2)]  # (runs, rows)
    data = [[(torch.randn(rows, heads, dim, generator=g), torch.randn(rows, heads, dim, generator=g))
             for _ in range(layers)] for _, rows in increments]
    try:
        for seq, ((runs, _), per_layer) in enumerate(zip(increments, data)):
            keys, values = [k for k, _ in per_layer], [v for _, v in per_layer]
            assert await store.save_increment("req-a", 1, seq, runs, keys, values)
        assert await store.save_increment("req-a", 0, 0, [(5, 9)], [torch.zeros(4, heads, dim)] * layers,
                                          [torch.ones(4, heads, dim)] * layers)

        shard = await store.load_shard("req-a", 1)
        assert shard.runs == [(0, 5), (9, 13), (14, 16)] and shard.tokens == 11
        for layer in range(layers):
            assert torch.equal(shard.keys[layer], torch.cat([d[layer][0] for d in data]))
            assert torch.equal(shard.values[layer], torch.cat([d[layer][1] for d in data]))
        assert await store.load_shard("req-a", 2) is None

        with pytest.raises(ValueError):  # rows and positions must agree
            three_rows = [torch.zeros(3, heads, dim)]
            await store.save_increment("req-a", 1, 3, [(20, 22)], three_rows, three_rows)

        redis = aioredis.from_url(servers.redis_url)
        try:
            await redis.delete("ringserve:shard:req-a:1:2:1")  # layer 2 of increment 1
            assert await store.load_shard("req-a", 1) is None
            assert await store.delete("req-a", 1) > 0
            assert await redis.smembers(members_key("req-a")) == {b"0"}
            assert (await store.load_shard("req-a", 0)).positions() == [5, 6, 7, 8]
            assert await store.delete("req-a") > 0
            assert await redis.keys("ringserve:shard:req-a:*") == []
        finally:
            await redis.aclose()
    finally:
        await store.close()


async def _until(predicate, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)


async def test_the_persister_saves_the_prefill_then_every_block_of_decode_rows(servers):
    every = 4
    store = ShardStore(Settings(redis_url=servers.redis_url, kv_shard_ttl_s=60))
    persister = ShardPersister(ShardStore(Settings(redis_url=servers.redis_url, kv_shard_ttl_s=60)), every)
    pool = KVPool(2, kv_heads=2, head_dim=4, page_tokens=4, pages=2, dtype=torch.float32,
                  device=torch.device("cpu"), growable=True)
    kv = RequestKV("req-p", 1, pool)

    def append(start, end):  # rows whose values are their positions
        rows = torch.arange(start, end, dtype=torch.float32)[:, None, None].expand(-1, 2, 4)
        kv.extend([rows, rows], [-rows, -rows])
        kv.note_positions(start, end)

    async def saved(tokens):
        shard = await store.load_shard("req-p", 1)
        return shard is not None and shard.tokens == tokens

    async def gone():
        return await store.load_shard("req-p", 1) is None

    try:
        append(10, 16)  # the member's prompt segment
        persister.track("req-p", 1, kv)
        await _until(lambda: saved(6))
        for position in (30, 31, 32):  # fewer than `every` decode rows: not yet saved
            append(position, position + 1)
            persister.grew("req-p")
        await asyncio.sleep(0.2)
        assert await saved(6)
        append(33, 34)
        persister.grew("req-p")
        await _until(lambda: saved(10))
        shard = await store.load_shard("req-p", 1)
        assert shard.runs == [(10, 16), (30, 34)]
        for layer in range(2):
            assert shard.keys[layer][:, 0, 0].tolist() == shard.positions()
            assert (shard.values[layer] == -shard.keys[layer]).all()

        persister.forget("req-p")
        await _until(gone)
    finally:
        await persister.close()
        await store.close()
