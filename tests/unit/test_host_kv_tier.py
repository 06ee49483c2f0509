"""The prefix cache's host tier: blocks the device tier evicts are copied to host memory (LRU
within a byte bound), and a prompt's leading blocks come back from both tiers, those in host
memory copied into fresh pages with the very bytes the pool held; every page goes back to the
pool exactly once."""

import pytest
import torch

from services.worker.host_kv_tier import HostKVTier
from services.worker.kv_cache import KVPool
from services.worker.resident_prefix import ResidentPrefix, TakenBlocks
from shared.messages import PromptBlock
from tests.helpers.engines import make_engine, tiny_llama
from tests.unit.test_resident_prefix import PAGE, command, run

LAYERS, KV_HEADS, DIM = 3, 2, 4
POOL_PAGES = 8
# On CUDA: pages of a Llama-3-8B-shaped model (32 layers, 8 KV heads of 128, 256-token blocks,
# 16 MiB of K a page), so that a copy that ran out of order with the compute stream would show.
CUDA_LAYERS, CUDA_KV_HEADS, CUDA_DIM, CUDA_PAGE = 32, 8, 128, 256
on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def small_pool(pages: int = POOL_PAGES) -> KVPool:
    return KVPool(LAYERS, KV_HEADS, DIM, PAGE, pages=pages, dtype=torch.bfloat16, device=torch.device("cpu"))


def cuda_pool(pages: int = POOL_PAGES) -> KVPool:
    return KVPool(CUDA_LAYERS, CUDA_KV_HEADS, CUDA_DIM, CUDA_PAGE, pages=pages, dtype=torch.bfloat16,
                  device=torch.device("cuda"))


def chain(n: int, page: int = PAGE) -> list[PromptBlock]:
    return [PromptBlock(index=i, start=i * page, end=(i + 1) * page, chain_hash=f"h{i}") for i in range(n)]


def filled(pool: KVPool, n: int, seed: int = 0) -> tuple[list[int], list[torch.Tensor]]:
    """n pages of random rows in every layer; -> (pages, each page's rows [2, L, KVH, P, d])."""
    pages = pool.alloc(n)
    generator = torch.Generator(pool.k_layers.device).manual_seed(seed)
    for page in pages:
        for layers in (pool.k_layers, pool.v_layers):
            shape = layers[:, page].shape
            layers[:, page] = torch.randn(shape, generator=generator, device=layers.device).to(layers.dtype)
    return pages, [page_rows(pool, page) for page in pages]


def page_rows(pool: KVPool, page: int) -> torch.Tensor:
    return torch.stack((pool.k_layers[:, page], pool.v_layers[:, page])).clone()


def kept(pool: KVPool, n: int, host_blocks: float, max_pages: int = POOL_PAGES):
    """A device tier holding n blocks (block 0 least recently used), a host tier of `host_blocks`."""
    resident = ResidentPrefix(pool, max_pages=max_pages, host_bytes=int(host_blocks * pool.page_bytes))
    pages, rows = filled(pool, n)
    resident.keep(chain(n, pool.page_tokens), pages)
    pool.free(pages)  # the request ends: only the device tier holds them now
    return resident, pages, rows


def assert_no_page_lost_or_doubled(pool: KVPool, held: int) -> None:
    assert pool.free_pages == pool.pages - held
    assert len(set(pool._free)) == len(pool._free)  # a page freed twice would be handed out twice


def test_evicted_blocks_go_to_host_memory_with_the_pools_bytes():
    pool = small_pool()
    resident, _, rows = kept(pool, 3, host_blocks=8)
    assert resident.evict(2) == 2  # blocks 0 and 1, least recently used
    assert len(resident) == 1 and len(resident.host) == 2 and resident.host.stores == 2
    for i in range(2):
        host = resident.host.get(f"h{i}")
        assert host.dtype == torch.bfloat16 and torch.equal(host, rows[i])
    assert_no_page_lost_or_doubled(pool, held=1)


def test_the_pool_reclaiming_pages_sends_blocks_to_the_host_tier():
    pool = small_pool()
    resident, _, rows = kept(pool, 6, host_blocks=8)
    request = pool.alloc(4)  # 2 free: two kept blocks give their pages back
    assert len(resident) == 4 and "h0" in resident.host and "h1" in resident.host
    assert torch.equal(resident.host.get("h1"), rows[1])
    pool.free(request)
    assert_no_page_lost_or_doubled(pool, held=4)


def test_the_host_tier_keeps_the_most_recent_blocks_within_its_bytes():
    pool = small_pool()
    resident, _, rows = kept(pool, 4, host_blocks=2.5)  # room for two whole blocks
    assert resident.host.capacity_blocks == 2
    resident.evict(4)
    assert resident.host.bytes == 2 * pool.page_bytes <= int(2.5 * pool.page_bytes)
    assert [h for h in ("h0", "h1", "h2", "h3") if h in resident.host] == ["h2", "h3"]
    assert resident.host.stores == 4 and resident.host.evictions == 2
    assert torch.equal(resident.host.get("h3"), rows[3])
    assert_no_page_lost_or_doubled(pool, held=0)


def test_host_memory_is_taken_in_segments_as_the_tier_fills_and_reused_once_full():
    pool = small_pool()
    tier = HostKVTier(pool, capacity_bytes=10 * pool.page_bytes, segment_bytes=4 * pool.page_bytes)
    pages, rows = filled(pool, 6)
    tier.store([(f"a{i}", page) for i, page in enumerate(pages[:5])])
    assert tier.reserved_bytes == 8 * pool.page_bytes and tier.bytes == 5 * pool.page_bytes
    tier.store([(f"b{i}", page) for i, page in enumerate(pages)])  # 11 blocks: the oldest dropped
    assert tier.reserved_bytes == tier.bytes == 10 * pool.page_bytes and tier.evictions == 1
    assert "a0" not in tier and torch.equal(tier.get("a1"), rows[1]) and torch.equal(tier.get("b5"), rows[5])


def test_a_take_maps_pool_blocks_and_copies_host_blocks_back_bit_for_bit():
    pool = small_pool()
    resident, pages, rows = kept(pool, 4, host_blocks=8)
    resident.evict(2)  # blocks 0 and 1 in host memory, 2 and 3 in the pool
    taken = resident.take(chain(4))
    assert taken is not None and taken[2:] == pages[2:]  # mapped, not copied
    assert resident.last_take == TakenBlocks(pool=2, host=2)
    assert resident.hits == 2 and resident.host.hits == 2
    for page, want in zip(taken, rows):
        assert torch.equal(page_rows(pool, page), want)
    # copied-back blocks join the device tier (and stay in host memory: nothing to copy next time)
    assert len(resident) == 4 and len(resident.host) == 2
    assert_no_page_lost_or_doubled(pool, held=4)
    pool.free(taken)  # the request ends: the device tier still holds all four
    assert_no_page_lost_or_doubled(pool, held=4)
    resident.evict(4)
    assert resident.host.stores == 4  # blocks 0 and 1 were held there already
    assert_no_page_lost_or_doubled(pool, held=0)


def test_a_take_copies_back_a_prefix_that_is_only_in_host_memory():
    pool = small_pool()
    resident, _, rows = kept(pool, 3, host_blocks=8)
    resident.evict(3)
    other = pool.alloc(POOL_PAGES - 3)  # the pool busy with another request
    taken = resident.take(chain(3))
    assert resident.last_take == TakenBlocks(pool=0, host=3)
    assert [torch.equal(page_rows(pool, p), want) for p, want in zip(taken, rows)] == [True] * 3
    pool.free(taken)
    pool.free(other)
    assert_no_page_lost_or_doubled(pool, held=3)


def test_a_take_with_a_block_in_no_tier_holds_nothing():
    pool = small_pool()
    resident, _, _ = kept(pool, 3, host_blocks=1)  # room for one block: block 0 is dropped
    resident.evict(2)
    assert resident.take(chain(3)) is None and resident.take(chain(3)[1:]) is None
    assert resident.hits == 0 and resident.host.hits == 0
    assert_no_page_lost_or_doubled(pool, held=1)


def test_a_full_pool_turns_a_host_hit_into_a_miss_and_lets_go_of_the_mapped_pages():
    pool = small_pool()
    resident, _, _ = kept(pool, 2, host_blocks=8)
    resident.evict(1)  # block 0 in host memory, block 1 in the pool
    running = pool.alloc(POOL_PAGES - 1)  # every other page held by a running request
    assert resident.take(chain(2)) is None
    # making room evicted block 1 too (to host memory); its page is free once the take let go
    assert len(resident) == 0 and "h1" in resident.host
    assert_no_page_lost_or_doubled(pool, held=POOL_PAGES - 1)
    pool.free(running)
    assert_no_page_lost_or_doubled(pool, held=0)


def test_a_host_block_dropped_while_making_room_turns_the_take_into_a_miss():
    pool = small_pool()
    resident = ResidentPrefix(pool, max_pages=POOL_PAGES, host_bytes=pool.page_bytes)  # one block
    pages, _ = filled(pool, 3)
    resident.keep(chain(2), pages[:2])
    resident.keep([PromptBlock(index=0, start=0, end=PAGE, chain_hash="x")], pages[2:])
    pool.free(pages)
    resident.evict(1)  # h0 to host memory; h1 and x in the pool
    running = pool.alloc(pool.free_pages)
    # room for h0's copy: x is evicted, and its store takes h0's slot
    assert resident.take(chain(2)) is None
    assert "x" in resident.host and "h0" not in resident.host and len(resident) == 1
    assert_no_page_lost_or_doubled(pool, held=len(running) + 1)
    pool.free(running)


def test_no_host_tier_at_zero_bytes():
    pool = small_pool()
    resident, _, _ = kept(pool, 3, host_blocks=0)
    assert resident.host is None
    resident.evict(2)
    assert resident.take(chain(3)) is None and resident.take(chain(1)) is None
    assert_no_page_lost_or_doubled(pool, held=1)


def test_a_prompt_served_from_host_memory_computes_what_a_fresh_prefill_does():
    model = tiny_llama()
    engine, fresh = make_engine(model, page_tokens=PAGE), make_engine(model, page_tokens=PAGE)
    engine.resident = ResidentPrefix(engine.pool, max_pages=64, host_bytes=64 * engine.pool.page_bytes)
    prefix = [(i * 7 + 3) % 97 for i in range(3 * PAGE)]  # 3 full blocks
    a_ids, b_ids = prefix + [4, 5, 6], prefix + [9, 8, 7, 6, 5]
    run(engine, command("a", a_ids))
    a = engine.requests["a"].kv
    a_rows = [(a.keys(layer, 0, 3 * PAGE).clone(), a.values(layer, 0, 3 * PAGE).clone()) for layer in range(2)]
    engine.release("a")
    engine.resident.evict(len(engine.resident))  # every kept block to host memory
    assert len(engine.resident) == 0 and len(engine.resident.host) == 3

    cmd = command("b", b_ids, cached=3 * PAGE)
    resident = engine.take_resident(cmd)
    assert engine.resident.last_take == TakenBlocks(pool=0, host=3)
    got, want = run(engine, cmd, resident), run(fresh, command("b", b_ids))
    assert got.token_id == want.token_id and got.cached_tokens == 3 * PAGE
    b = engine.requests["b"].kv
    for layer, (keys, values) in enumerate(a_rows):  # the very rows request a wrote
        assert torch.equal(b.keys(layer, 0, 3 * PAGE), keys) and torch.equal(b.values(layer, 0, 3 * PAGE), values)


@on_cuda
def test_on_cuda_blocks_go_through_pinned_memory_in_order_with_the_compute_stream():
    """Evicted pages written over at once by the compute stream keep their host copies; pages
    copied back are read at once by the compute stream: both see the copies' bytes (the tier's
    stream and the compute stream wait for each other)."""
    pool = cuda_pool()
    resident, _, rows = kept(pool, 4, host_blocks=8)
    resident.evict(3)  # blocks 0, 1, 2 to pinned memory; block 3 stays
    assert all(resident.host.get(f"h{i}").is_pinned() for i in range(3))
    other = pool.alloc(POOL_PAGES - 1)  # the evicted pages among them, written over at once
    for page in other:
        pool.k_layers[:, page].fill_(-1)
        pool.v_layers[:, page].fill_(-1)
    pool.free(other)
    taken = resident.take(chain(4, CUDA_PAGE))
    assert resident.last_take == TakenBlocks(pool=1, host=3)
    got = [page_rows(pool, page) for page in taken]  # queued on the compute stream, no synchronize
    assert all(torch.equal(g.cpu(), want.cpu()) for g, want in zip(got, rows))
    pool.free(taken)
    resident.evict(4)
    assert_no_page_lost_or_doubled(pool, held=0)
