"""H2O importance: the attention mass each cached key receives, and its sum per stored block."""

import torch

import shared.attention.paged as paged_module
from services.worker.prefix import block_masses
from shared.attention.decode import decode_partial
from shared.attention.merge import merge_partials
from shared.attention.paged import paged_key_attention_mass
from shared.messages import PromptBlock

PAGE, HEADS, KV_HEADS, DIM, SCALE = 4, 8, 2, 16, 0.25


def softmax_mass(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [1, H, d], k [n, KVH, d] -> [n]: softmax over all keys per head (GQA: head h reads kv
    head h // 4), summed over heads, in float64."""
    kf = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
    probs = torch.softmax(torch.einsum("thd,nhd->thn", q.double(), kf.double()) * SCALE, dim=-1)
    return probs.sum(dim=(0, 1))


def into_pool(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences' keys [n, KVH, d] -> (pool [pages, KVH, P, d], block table, seq lens), their pages
    shuffled in the pool and page 0 left as scratch, as the worker's pool keeps them."""
    width = max(-(-k.shape[0] // PAGE) for k in seqs)
    pages = 1 + sum(-(-k.shape[0] // PAGE) for k in seqs)
    pool = torch.randn(pages, KV_HEADS, PAGE, DIM)  # garbage where no row is
    order = torch.randperm(pages - 1).add(1).tolist()
    table = torch.zeros(len(seqs), width, dtype=torch.int32)
    for b, k in enumerate(seqs):
        for j in range(-(-k.shape[0] // PAGE)):
            page = order.pop()
            rows = k[j * PAGE : (j + 1) * PAGE]
            pool[page, :, : rows.shape[0]] = rows.transpose(0, 1)
            table[b, j] = page
    return pool, table, torch.tensor([k.shape[0] for k in seqs], dtype=torch.int32)


def test_paged_mass_of_a_batch_is_each_sequence_softmax():
    torch.manual_seed(0)
    seqs = [torch.randn(n, KV_HEADS, DIM) for n in (13, 4, 1, 9)]
    q = torch.randn(len(seqs), HEADS, DIM)
    pool, table, lens = into_pool(seqs)
    mass = paged_key_attention_mass(q, pool, table, lens, SCALE)
    for b, k in enumerate(seqs):
        n = k.shape[0]
        assert torch.allclose(mass[b, :n].double(), softmax_mass(q[b : b + 1], k), rtol=1e-5, atol=1e-7)
        assert float(mass[b, n:].abs().sum()) == 0.0  # rows past the sequence (garbage in the pool) get nothing
        assert abs(float(mass[b].sum()) - HEADS) < 1e-4  # each head distributes mass 1


def test_paged_mass_in_chunks_of_sequences_is_the_same(monkeypatch):
    torch.manual_seed(1)
    seqs = [torch.randn(n, KV_HEADS, DIM) for n in (7, 16, 3)]
    q = torch.randn(len(seqs), HEADS, DIM)
    pool, table, lens = into_pool(seqs)
    whole = paged_key_attention_mass(q, pool, table, lens, SCALE)
    monkeypatch.setattr(paged_module, "MASS_GATHER_BYTES", 1)  # one sequence per chunk
    assert torch.equal(paged_key_attention_mass(q, pool, table, lens, SCALE), whole)


def test_mass_over_shards_with_the_global_lse_is_the_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, HEADS, DIM), torch.randn(30, KV_HEADS, DIM), torch.randn(30, KV_HEADS, DIM)
    expected = softmax_mass(q, k)
    # two shards, as two ring members hold them; the lse is the merged (global) one
    shards = ((0, 12), (12, 30))
    parts = [decode_partial(q, k[a:b], v[a:b], SCALE) for a, b in shards]
    _, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    mass = []
    for a, b in shards:
        pool, table, lens = into_pool([k[a:b]])
        mass.append(paged_key_attention_mass(q, pool, table, lens, SCALE, lse)[0, : b - a])
    mass = torch.cat(mass)
    assert torch.allclose(mass.double(), expected, rtol=1e-5, atol=1e-7)
    assert abs(float(mass.sum()) - HEADS) < 1e-4


def test_block_mass_follows_the_positions_of_the_rows():
    # rows hold positions 0..4 then 10..14; the mass of row r is r + 1
    runs, mass = [(0, 5), (10, 15)], torch.arange(1.0, 11.0)
    blocks = [PromptBlock(index=0, start=0, end=4, chain_hash="a"),
              PromptBlock(index=1, start=4, end=8, chain_hash="b"),   # only position 4 held
              PromptBlock(index=3, start=12, end=16, chain_hash="d"),  # positions 12..14 held
              PromptBlock(index=4, start=16, end=20, chain_hash="e")]  # nothing held: not reported
    assert block_masses(runs, mass, blocks) == [("a", 10.0), ("b", 5.0), ("d", 8.0 + 9.0 + 10.0)]
    # mass measured before the last rows were appended covers only the first rows
    assert block_masses(runs, mass[:8], blocks[2:3]) == [("d", 8.0)]
