"""H2O importance: the attention mass each cached key receives, and its sum per stored block."""

import torch

from services.worker.prefix import block_masses
from shared.attention.decode import decode_partial, key_attention_mass
from shared.attention.merge import merge_partials
from shared.messages import PromptBlock


def test_mass_over_shards_with_the_global_lse_is_the_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 8, 16), torch.randn(30, 2, 16), torch.randn(30, 2, 16)
    scale = 0.25
    # reference: softmax over all keys, per head (GQA: head h uses kv head h // 4), summed over heads
    kf = k.repeat_interleave(4, dim=1)
    probs = torch.softmax(torch.einsum("thd,nhd->thn", q.double(), kf.double()) * scale, dim=-1)
    expected = probs.sum(dim=(0, 1))
    # two shards, as two ring members hold them; the lse is the merged (global) one
    parts = [decode_partial(q, k[a:b], v[a:b], scale) for a, b in ((0, 12), (12, 30))]
    _, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    mass = torch.cat([key_attention_mass(q, k[a:b], scale, lse) for a, b in ((0, 12), (12, 30))])
    assert torch.allclose(mass.double(), expected, rtol=1e-5, atol=1e-7)
    assert abs(float(mass.sum()) - 8.0) < 1e-4  # each of the 8 heads distributes mass 1


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
