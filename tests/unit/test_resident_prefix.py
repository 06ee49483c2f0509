"""The prefix cache's device tier: a one-worker request's full prompt blocks stay in the KV pool
after it ends, and a later prompt with the same prefix maps those pages (no copy, no Redis):
its rows and first token are a fresh prefill's; shared pages go back only when every holder
lets go; a pool that needs pages takes the least recently used blocks back first."""

import torch

from services.worker.chunked_prefill import PrefillChunks
from services.worker.kv_cache import KVPool
from services.worker.resident_prefix import ResidentPrefix
from shared.kv.keys import block_chain
from shared.messages import PrefillCommand, PromptBlock, RingPlan, SamplingParams, Segment
from tests.helpers.engines import make_engine, tiny_llama

PAGE = 8  # tests.helpers.engines' page size must match: make_engine(page_tokens=PAGE)


def command(rid: str, ids: list[int], cached: int = 0) -> PrefillCommand:
    n = len(ids)
    plan = RingPlan(request_id=rid, workers=["w"], world_ranks=[0], world_generation=0, chunk_tokens=n,
                    segments=[[Segment(start=0, end=n)]], prompt_tokens=n, fusion_partition="p")
    blocks = [PromptBlock(index=b.index, start=b.start, end=b.end, chain_hash=b.chain_hash, parent_hash=b.parent_hash)
              for b in block_chain("m", ids, PAGE)]
    return PrefillCommand(plan=plan, member=0, input_ids=ids, sampling=SamplingParams(), cached_tokens=cached,
                          kv_blocks=blocks)


def run(engine, cmd: PrefillCommand, resident=None):
    state: PrefillChunks = engine.prefill_begin(cmd, None, resident)
    while not state.finished:
        engine.prefill_chunk(state, 5)
    return engine.prefill_end(state)


def test_shared_pages_go_back_when_every_holder_lets_go():
    pool = KVPool(1, 1, 4, PAGE, pages=4, dtype=torch.float32, device=torch.device("cpu"))
    pages = pool.alloc(2)
    pool.retain(pages)  # a second holder
    pool.free(pages)
    assert pool.free_pages == 2  # still held
    pool.free(pages)
    assert pool.free_pages == 4


def test_a_later_prompt_maps_the_kept_blocks_and_computes_what_a_fresh_prefill_does():
    model = tiny_llama()
    engine, fresh = make_engine(model, page_tokens=PAGE), make_engine(model, page_tokens=PAGE)
    engine.resident = ResidentPrefix(engine.pool, max_pages=64)
    prefix = [(i * 5 + 1) % 97 for i in range(3 * PAGE)]  # 3 full blocks
    a_ids, b_ids = prefix + [4, 5, 6], prefix + [9, 8, 7, 6, 5]
    run(engine, command("a", a_ids))
    a_pages = list(engine.requests["a"].kv.pages[:3])
    engine.release("a")
    assert len(engine.resident) == 3

    cmd = command("b", b_ids, cached=3 * PAGE)
    resident = engine.take_resident(cmd)
    assert resident == a_pages and engine.resident.hits == 3
    got = run(engine, cmd, resident)
    want = run(fresh, command("b", b_ids))
    assert got.token_id == want.token_id and got.cached_tokens == 3 * PAGE
    mine, theirs = engine.requests["b"].kv, fresh.requests["b"].kv
    assert mine.pages[:3] == a_pages  # mapped, not copied
    for layer in range(2):
        torch.testing.assert_close(mine.keys(layer), theirs.keys(layer), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.values(layer), theirs.values(layer), rtol=1e-5, atol=1e-6)
    # a prompt with another prefix finds nothing; one asking for more blocks than are kept neither
    assert engine.take_resident(command("c", [1] * (3 * PAGE + 1), cached=3 * PAGE)) is None
    assert engine.take_resident(command("d", b_ids + [1] * PAGE, cached=4 * PAGE)) is None


def test_the_pool_takes_kept_blocks_back_least_recent_first_when_it_needs_pages():
    pool = KVPool(1, 1, 4, PAGE, pages=4, dtype=torch.float32, device=torch.device("cpu"))
    resident = ResidentPrefix(pool, max_pages=8)
    pages = pool.alloc(3)
    blocks = [PromptBlock(index=i, start=i * PAGE, end=(i + 1) * PAGE, chain_hash=f"h{i}") for i in range(3)]
    resident.keep(blocks, pages)
    pool.free(pages)  # the request ends: only the kept blocks hold the pages now
    assert pool.free_pages == 1 and len(resident) == 3
    assert resident.take(blocks[:1]) == pages[:1]  # block 0 used again: the most recent now
    pool.free(pages[:1])  # (that request ended)
    assert len(pool.alloc(3)) == 3  # two kept blocks taken back, block 0 kept
    assert len(resident) == 1 and resident.take(blocks[:1]) == pages[:1]
