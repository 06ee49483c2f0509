"""A Redis restart mid-run: the store and the service answer misses and no-ops while it is down,
log the outage once per process, and work again when it is back."""

from __future__ import annotations

import asyncio
import subprocess

import pytest
import torch
from structlog.testing import capture_logs

from services.kvstore.service import KVStoreService
from shared.kv.keys import block_chain
from shared.kv.messages import KVCommitBlock, KVCommitRequest, KVLookupRequest
from shared.kv.store import KVBlockStore
from shared.settings import Settings
from tests.integration.stack import find_binary, free_port, wait_port

pytestmark = pytest.mark.integration

BLOCK, LAYERS, QUANT, MODEL = 4, 2, "int8", "restart-model"
RETRY_S = 0.2
CALLS_WHILE_DOWN = 5


def _start_redis(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([find_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(port),
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


async def _commit(service, refs, nbytes):
    blocks = [KVCommitBlock(index=r.index, chain_hash=r.chain_hash, parent_hash=r.parent_hash) for r in refs]
    return await service.commit(KVCommitRequest(model_id=MODEL, quant=QUANT, num_layers=LAYERS, blocks=blocks,
                                                nbytes=nbytes))


async def _lookup(service, refs) -> int:
    return (await service.lookup(KVLookupRequest(model_id=MODEL, quant=QUANT, num_layers=LAYERS,
                                                 hashes=[r.chain_hash for r in refs]))).blocks


async def test_redis_restart_mid_run():
    port = free_port()
    redis_proc = _start_redis(port)
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", kv_block_tokens=BLOCK, kv_group_size=BLOCK,
                        kv_hot_cache_bytes=0, kv_redis_retry_s=RETRY_S, kv_redis_timeout_s=1.0)
    store, service = KVBlockStore(settings), KVStoreService(settings)
    refs = block_chain(MODEL, list(range(3 * BLOCK)), BLOCK)

    def items():
        return [(layer, ref, torch.randn(BLOCK, 1, 8), torch.randn(BLOCK, 1, 8))
                for layer in range(LAYERS) for ref in refs]

    try:
        nbytes = await store.put_blocks(items(), MODEL, QUANT)
        await _commit(service, refs, nbytes)
        assert await _lookup(service, refs) == 3

        redis_proc.kill()
        redis_proc.wait()
        with capture_logs() as down_logs:
            for _ in range(CALLS_WHILE_DOWN):
                assert await store.put_blocks(items(), MODEL, QUANT) == 0
                assert await store.get_blocks(MODEL, refs, range(LAYERS), QUANT, torch.float32, "cpu") == {}
                assert await _lookup(service, refs) == 0
                assert (await _commit(service, refs, nbytes)).error  # a reply saying so, not an exception
                assert (await service.stats()).error
                await asyncio.sleep(RETRY_S / 2)
        # One line per outage per process, however many calls of however many clients (the store's
        # and the service's, as a worker's block and shard stores) failed.
        assert [e["event"] for e in down_logs if e["log_level"] == "warning"] == ["kv_redis_unavailable"]

        redis_proc = _start_redis(port)  # back, empty (no persistence)
        await asyncio.sleep(RETRY_S)
        with capture_logs() as up_logs:
            nbytes = await store.put_blocks(items(), MODEL, QUANT)
            assert nbytes > 0
            await _commit(service, refs, nbytes)
            assert await _lookup(service, refs) == 3
            got = await store.get_blocks(MODEL, refs, range(LAYERS), QUANT, torch.float32, "cpu")
            assert len(got) == LAYERS * len(refs)
        assert [e["event"] for e in up_logs] == ["kv_redis_recovered"]
    finally:
        await store.close()
        await service.close()
        redis_proc.kill()
        redis_proc.wait()
