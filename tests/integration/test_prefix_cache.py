"""Prefix caching end to end: the scheduler looks a prompt up in the kvstore, ring members load the
cached blocks instead of computing them and store the blocks they computed; greedy tokens stay
those of transformers. Real processes, real NATS and Redis (each stack its own)."""

import asyncio
import json
import subprocess

import nats
import pytest

from shared.bus import Bus
from shared.checkpoint import model_id
from shared.kv.client import KVIndexClient
from shared.kv.keys import block_chain
from shared.settings import Settings
from tests.integration.stack import Stack, find_binary, wait_port
from tests.integration.test_ring_equivalence import NEW_TOKENS, hf_greedy, tiny_llama  # noqa: F401

pytestmark = pytest.mark.integration

BLOCK = 16
CHUNK = 24  # not a multiple of BLOCK: blocks straddle chunks (and ring members)
LAYERS = 2  # tiny_dims
VOCAB = 300
STORE_WAIT_S = 20.0
SERVICES = ("fusion", "scheduler", "kvstore")


def _ids(n, salt):
    return [(i * 41 + 7 * salt + i * i * salt) % 290 + 5 for i in range(n)]


def _env(path, **extra):
    # These tests are about loading cached blocks: on this tiny CPU model computing beats a Redis
    # load, and the cost model (prefix_costs.py) would rightly compute instead; it is off here.
    return {"RINGSERVE_MODEL": str(path), "RINGSERVE_KV_BLOCK_TOKENS": str(BLOCK),
            "RINGSERVE_CHUNK_TOKENS": str(CHUNK), "RINGSERVE_KV_COST_MODEL": "false", **extra}


def _stack(tmp_path_factory, name: str, workers: int, env: dict):
    """A module's stack of `workers` workers (a generator for a fixture: stopped after the module)."""
    stack = Stack(tmp_path_factory.mktemp(name), workers=workers, services=SERVICES, env=env)
    try:
        asyncio.run(stack.wait_ready(workers))
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def single_stack(tmp_path_factory, tiny_llama):  # noqa: F811
    yield from _stack(tmp_path_factory, "prefix-one", 1, _env(tiny_llama[0]))


@pytest.fixture(scope="module")
def ring_stack(tmp_path_factory, tiny_llama):  # noqa: F811
    yield from _stack(tmp_path_factory, "prefix-ring", 3, _env(tiny_llama[0], RINGSERVE_MAX_RING_SIZE="2"))


async def _generate(stack, ids, **fields):
    reply = await stack.generate({"input_ids": ids, "max_new_tokens": NEW_TOKENS, **fields})
    assert "error" not in reply, f"{reply}\n{stack.logs()}"
    return reply


def _matches_transformers(model, ids, reply):
    got, expected = reply["output_ids"], hf_greedy(model, ids)
    return got == expected[: len(got)] and (len(got) == NEW_TOKENS or got[-1] == 2)


async def _wait_stored(stack, path, ids, blocks, quant="none"):
    """Until the kvstore reports `blocks` leading blocks of `ids` stored (workers store after replying)."""
    settings = Settings(nats_url=stack.servers.nats_url, kv_index_timeout_s=1.0)
    nc = await nats.connect(stack.servers.nats_url)
    try:
        client = KVIndexClient(Bus(nc, "test"), settings)
        name = model_id(Settings(model=str(path)))
        refs = block_chain(name, ids, BLOCK)
        deadline = asyncio.get_running_loop().time() + STORE_WAIT_S
        while (found := await client.lookup(name, refs, quant, LAYERS)) < blocks:
            assert asyncio.get_running_loop().time() < deadline, f"{found}/{blocks} blocks stored\n{stack.logs()}"
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def redis_tier_stack(tmp_path_factory, tiny_llama):  # noqa: F811
    """One worker that keeps no prompt blocks in its pool: every hit is loaded from Redis."""
    yield from _stack(tmp_path_factory, "prefix-redis", 1, _env(tiny_llama[0], RINGSERVE_KV_RESIDENT_PREFIX="false"))


def _worker_events(stack, event: str) -> list[dict]:
    lines = (stack.workdir / "worker0.log").read_text().splitlines()
    return [e for e in (json.loads(line) for line in lines if line.startswith("{")) if e.get("event") == event]


async def _shared_prefix_hits(stack, path, model, salt: int) -> None:
    prefix = _ids(5 * BLOCK, salt)
    first_ids, other_ids = prefix + _ids(10, salt + 1), prefix + _ids(9, salt + 2)

    first = await _generate(stack, first_ids)
    assert first["usage"]["cached_tokens"] == 0
    await _wait_stored(stack, path, first_ids, 5)
    again = await _generate(stack, first_ids)
    other = await _generate(stack, other_ids)

    assert again["usage"]["cached_tokens"] == 5 * BLOCK and again["output_ids"] == first["output_ids"]
    assert other["usage"]["cached_tokens"] == 5 * BLOCK
    assert _matches_transformers(model, first_ids, first) and _matches_transformers(model, other_ids, other)


async def test_a_shared_prefix_is_mapped_from_the_workers_pool(single_stack, tiny_llama):  # noqa: F811
    """The device tier: the kept blocks' pages, no Redis read."""
    path, model = tiny_llama
    before = len(_worker_events(single_stack, "kv_prefix_resident_hit"))
    await _shared_prefix_hits(single_stack, path, model, salt=1)
    assert len(_worker_events(single_stack, "kv_prefix_resident_hit")) - before == 2, single_stack.logs()


async def test_a_shared_prefix_is_loaded_from_redis_on_one_worker(redis_tier_stack, tiny_llama):  # noqa: F811
    path, model = tiny_llama
    await _shared_prefix_hits(redis_tier_stack, path, model, salt=11)
    assert _worker_events(redis_tier_stack, "kv_prefix_resident_hit") == []


# A pool of 9 pages (8 for 128 tokens, one for the decode step's one request): a prompt of 100
# tokens after one of 90 takes pages the first one's kept blocks hold.
HOST_TIER_POOL_TOKENS = 128


@pytest.fixture(scope="module")
def host_tier_stack(tmp_path_factory, tiny_llama):  # noqa: F811
    """One worker whose KV pool is too small to keep two prompts' blocks: the older ones go to
    its host tier."""
    yield from _stack(tmp_path_factory, "prefix-host", 1, _env(
        tiny_llama[0], RINGSERVE_WORKER_MAX_TOKENS=str(HOST_TIER_POOL_TOKENS), RINGSERVE_DECODE_MAX_BATCH="1",
        RINGSERVE_KV_HOST_CACHE_BYTES=str(64 * 1024**2)))


async def _released(stack, request_id: str) -> None:
    """Until the worker has let go of the request (its blocks kept): the next one finds them."""
    deadline = asyncio.get_running_loop().time() + STORE_WAIT_S
    while not any(e.get("request_id") == request_id for e in _worker_events(stack, "request_released")):
        assert asyncio.get_running_loop().time() < deadline, stack.logs()
        await asyncio.sleep(0.05)


async def test_a_prefix_evicted_from_the_pool_is_copied_back_from_host_memory(host_tier_stack, tiny_llama):  # noqa: F811
    """The host tier: a prompt's blocks, evicted from the pool by a later prompt, come back from
    the worker's host memory (some still in the pool: both tiers), and give a miss's tokens."""
    path, model = tiny_llama
    stack = host_tier_stack
    ids = _ids(5 * BLOCK, 31) + _ids(10, 32)
    miss = await _generate(stack, ids, request_id="host-miss")
    assert miss["usage"]["cached_tokens"] == 0
    await _released(stack, "host-miss")
    await _wait_stored(stack, path, ids, 5)
    other = await _generate(stack, _ids(100, 33), request_id="host-other")  # 7 pages: 3 kept blocks evicted
    assert other["usage"]["cached_tokens"] == 0
    await _released(stack, "host-other")

    hits = len(_worker_events(stack, "kv_prefix_resident_hit"))
    hit = await _generate(stack, ids, request_id="host-hit")
    assert hit["usage"]["cached_tokens"] == 5 * BLOCK and hit["output_ids"] == miss["output_ids"]
    assert _matches_transformers(model, ids, hit)
    assert len(_worker_events(stack, "kv_prefix_resident_hit")) == hits + 1, stack.logs()  # no Redis read
    (load,) = _worker_events(stack, "kv_prefix_host_load")
    assert load["blocks"] == 3 and load["pool_blocks"] == 2, load


async def test_decode_attention_mass_reaches_the_kvstore_as_block_importance(single_stack, tiny_llama):  # noqa: F811
    import redis.asyncio as aioredis

    path, _ = tiny_llama
    ids = _ids(3 * BLOCK, 7)
    await _generate(single_stack, ids)
    await _wait_stored(single_stack, path, ids, 3)
    await _generate(single_stack, ids)  # its blocks are indexed now: the release reports their mass
    meta = aioredis.Redis(port=single_stack.servers.redis_port)
    try:
        name = model_id(Settings(model=str(path)))
        members = [f"none:{r.chain_hash}" for r in block_chain(name, ids, BLOCK)]  # the kvstore's ZSET members
        deadline = asyncio.get_running_loop().time() + STORE_WAIT_S
        while True:
            scores = [await meta.zscore("ringserve:kvmeta:importance", m) for m in members]
            if all(score is not None and score > 0 for score in scores):
                break
            assert asyncio.get_running_loop().time() < deadline, f"importance {scores}\n{single_stack.logs()}"
            await asyncio.sleep(0.1)
    finally:
        await meta.aclose()


async def test_int8_blocks_are_loaded_and_give_valid_tokens(single_stack, tiny_llama):  # noqa: F811
    path, _ = tiny_llama
    ids = _ids(70, 4)
    first = await _generate(single_stack, ids, kv_quant="int8")
    await _wait_stored(single_stack, path, ids, 4, quant="int8")
    # the unquantized blocks of this prompt were never stored: a request without int8 finds none
    plain = await _generate(single_stack, ids, kv_quant="none")
    second = await _generate(single_stack, ids, kv_quant="int8")
    assert first["usage"]["cached_tokens"] == plain["usage"]["cached_tokens"] == 0
    assert second["usage"]["cached_tokens"] == 4 * BLOCK
    for reply in (first, second):
        tokens = reply["output_ids"]
        assert 0 < len(tokens) <= NEW_TOKENS and all(0 <= t < VOCAB for t in tokens)
        assert len(tokens) == NEW_TOKENS or tokens[-1] == 2


async def test_ring_members_load_the_rows_they_hold_of_blocks_across_chunks(ring_stack, tiny_llama):  # noqa: F811
    path, model = tiny_llama
    # On a ring every block straddling two members is not stored. 70 tokens (3 chunks) are dealt
    # in 4 units of 18: member 0 holds [0, 18) + [54, 70), member 1 [18, 54); block 1 [16, 32)
    # straddles them, so the reusable chain is block 0 alone.
    short = _ids(70, 5)
    first = await _generate(ring_stack, short)
    assert len(first["placement"]["workers"]) == 2 and first["usage"]["cached_tokens"] == 0
    await _wait_stored(ring_stack, path, short, 1)
    again = await _generate(ring_stack, short)
    assert again["usage"]["cached_tokens"] == BLOCK and again["output_ids"] == first["output_ids"]

    # A prompt run on one worker stores all its blocks; a ring then loads them across chunk
    # boundaries: member 0 holds [0, 24) + [72, 96), member 1 [24, 72), all of it cached.
    busy = asyncio.create_task(ring_stack.generate({"input_ids": _ids(30, 6), "max_new_tokens": 400,
                                                    "request_id": "keeps-two-workers-busy"}))
    await _wait_busy(ring_stack, workers=2)
    prefix = _ids(5 * BLOCK, 7)
    alone_ids = prefix + _ids(10, 8)
    alone = await _generate(ring_stack, alone_ids)
    assert len(alone["placement"]["workers"]) == 1
    await _cancel(ring_stack, "keeps-two-workers-busy")
    assert (await busy)["finish_reason"] == "cancelled"
    await _wait_stored(ring_stack, path, alone_ids, 5)

    ring_ids = prefix + _ids(BLOCK, 9)
    ring = await _generate(ring_stack, ring_ids)
    assert len(ring["placement"]["workers"]) == 2 and ring["usage"]["cached_tokens"] == 5 * BLOCK
    assert _matches_transformers(model, ring_ids, ring) and _matches_transformers(model, alone_ids, alone)


async def _wait_busy(stack, workers, timeout=30.0):
    nc = await nats.connect(stack.servers.nats_url)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while sum(w["active_requests"] > 0 for w in (await stack.status(nc))["workers"]) < workers:
            assert asyncio.get_running_loop().time() < deadline, stack.logs()
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def _cancel(stack, request_id):
    nc = await nats.connect(stack.servers.nats_url)
    try:
        reply = await nc.request("ringserve.v1.cancel", json.dumps({"request_id": request_id}).encode(), timeout=5)
        assert json.loads(reply.data)["cancelled"] is True
    finally:
        await nc.close()


def _restart_redis(stack):
    """Kill the stack's redis-server (its data goes with it) and start a fresh one on the same port."""
    servers = stack.servers
    servers.procs[1].kill()
    servers.procs[1].wait(10)
    return lambda: _start_redis(servers)


def _start_redis(servers):
    servers.procs[1] = subprocess.Popen(
        [find_binary("redis-server"), "--bind", "127.0.0.1", "--port", str(servers.redis_port), "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(servers.redis_port)


async def test_a_redis_restart_loses_no_request_and_caching_resumes(single_stack, tiny_llama):  # noqa: F811
    path, model = tiny_llama
    ids = _ids(3 * BLOCK + 5, 10)
    running = asyncio.create_task(single_stack.generate({"input_ids": ids, "max_new_tokens": 200}))
    # Redis goes down at once and stays down until `running` has ended: the whole request runs
    # in the outage (waiting to see the worker busy missed a request this short under load).
    start_again = _restart_redis(single_stack)
    try:
        during = [await _generate(single_stack, ids) for _ in range(2)]
        assert "error" not in (finished := await running), finished
    finally:
        start_again()
    assert all(r["usage"]["cached_tokens"] == 0 and _matches_transformers(model, ids, r) for r in during)

    # Stores resume once the clients retry; the next lookup finds the re-stored blocks.
    deadline = asyncio.get_running_loop().time() + STORE_WAIT_S
    while (after := await _generate(single_stack, ids))["usage"]["cached_tokens"] == 0:
        assert asyncio.get_running_loop().time() < deadline, single_stack.logs()
        await asyncio.sleep(0.2)
    assert after["usage"]["cached_tokens"] == 3 * BLOCK and _matches_transformers(model, ids, after)


async def _until_workers(stack, nc, condition, timeout=20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        workers = (await stack.status(nc))["workers"]
        if condition(workers):
            return workers
        assert asyncio.get_running_loop().time() < deadline, workers
        await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
def two_worker_stack(tmp_path_factory, tiny_llama):  # noqa: F811
    """Two workers, every prompt on one of them (a chunk longer than any prompt here)."""
    yield from _stack(tmp_path_factory, "prefix-two", 2, _env(tiny_llama[0], RINGSERVE_CHUNK_TOKENS="4096"))


async def test_a_prompt_goes_to_the_worker_that_holds_its_prefix(two_worker_stack, tiny_llama):  # noqa: F811
    """Cache-aware placement: the least loaded worker would be the other one (a long request
    runs on the blocks' worker), but the prompt goes where its blocks are, and maps them."""
    path, model = tiny_llama
    stack = two_worker_stack
    prefix = _ids(4 * BLOCK, 21)
    first = await _generate(stack, prefix + _ids(7, 22))
    home = first["placement"]["workers"]
    await _wait_stored(stack, path, prefix + _ids(7, 22), 4)
    nc = await nats.connect(stack.servers.nats_url)
    try:
        await _until_workers(stack, nc, lambda ws: all(w["active_requests"] == 0 for w in ws))
        busy = asyncio.create_task(stack.generate({"input_ids": _ids(20, 23), "max_new_tokens": 150}))
        # both idle, so the long request goes where `first` went (the same tie-break): to the home
        workers = await _until_workers(stack, nc, lambda ws: any(w["active_requests"] for w in ws))
    finally:
        await nc.close()
    assert [w["worker_id"] for w in workers if w["active_requests"]] == home, workers
    try:
        other = await _generate(stack, prefix + _ids(9, 24))
        assert other["placement"]["workers"] == home, (home, other["placement"])
        assert other["usage"]["cached_tokens"] == 4 * BLOCK
        assert _matches_transformers(model, prefix + _ids(9, 24), other)
    finally:
        await busy
