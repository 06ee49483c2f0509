"""Prefix caching on the worker: which blocks a ring member loads and stores, how rows are cut out
of blocks, and a prefill with loaded rows computing what a full prefill computes."""

from __future__ import annotations

import pytest
import torch
from opentelemetry import trace

from shared.kv.keys import block_chain
from shared.messages import ModelInfo, PrefillCommand, RingPlan, SamplingParams, Segment
from shared.model import LlamaModel, parse_model_config
from shared.settings import Settings
from services.scheduler.prefix import PrefixIndex, cached_prompt_tokens, member_blocks
from tests.helpers.engines import make_engine
from services.worker.kv_cache import CachedRows
from services.worker.prefix import blocks_inside, blocks_overlapping, gather_rows

BLOCK = 4


def test_cached_tokens_are_whole_stored_blocks_and_never_the_last_position():
    assert cached_prompt_tokens(stored_blocks=0, block_tokens=16, prompt_tokens=100) == 0
    assert cached_prompt_tokens(stored_blocks=3, block_tokens=16, prompt_tokens=100) == 48
    assert cached_prompt_tokens(stored_blocks=6, block_tokens=16, prompt_tokens=100) == 96
    # a prompt of exactly 4 blocks, all stored: the last block is recomputed for its last position
    assert cached_prompt_tokens(stored_blocks=4, block_tokens=16, prompt_tokens=64) == 48
    assert cached_prompt_tokens(stored_blocks=1, block_tokens=16, prompt_tokens=16) == 0
    assert cached_prompt_tokens(stored_blocks=1, block_tokens=16, prompt_tokens=17) == 16


def test_a_member_loads_blocks_it_overlaps_and_stores_only_blocks_it_holds_whole():
    blocks = block_chain("m", list(range(20)), BLOCK)  # [0,4) [4,8) ... [16,20)
    runs = [(0, 6), (14, 20)]  # chunk boundaries at 6 and 14 cut blocks 1 and 3
    assert [b.index for b in blocks_overlapping(blocks, runs)] == [0, 1, 3, 4]
    assert [b.index for b in blocks_inside(blocks, runs)] == [0, 4]
    # what the scheduler sends each member: the same blocks, as messages
    sent = member_blocks(blocks, [Segment(start=s, end=e) for s, e in runs])
    assert [(b.index, b.start, b.end, b.chain_hash) for b in sent] == [
        (b.index, b.start, b.end, b.chain_hash) for b in blocks if b.index in (0, 1, 3, 4)
    ]
    assert sent[1].parent_hash == blocks[0].chain_hash


def test_rows_are_cut_from_the_blocks_covering_each_run():
    blocks = block_chain("m", list(range(16)), BLOCK)
    # block i holds rows whose value is their position
    rows = {b.index: torch.arange(b.start, b.end).float()[:, None, None] for b in blocks}
    runs = [(2, 7), (13, 15)]
    got = gather_rows(runs, [(b, rows[b.index]) for b in blocks_overlapping(blocks, runs)])
    assert got.flatten().tolist() == [2, 3, 4, 5, 6, 13, 14]
    with pytest.raises(ValueError):  # block 1 missing: positions 4..6 uncovered
        gather_rows(runs, [(b, rows[b.index]) for b in blocks if b.index != 1])


def _model() -> LlamaModel:
    raw = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 128}
    torch.manual_seed(0)
    model = LlamaModel(parse_model_config(raw)).eval()
    with torch.no_grad():  # larger logits than the default init: a wrong row changes the token
        model.lm_head.weight.mul_(8)
    return model


def _command(request_id: str, ids: list[int], cached: int) -> PrefillCommand:
    plan = RingPlan(request_id=request_id, workers=["w"], world_ranks=[0], world_generation=0, chunk_tokens=len(ids),
                    segments=[[Segment(start=0, end=len(ids))]], prompt_tokens=len(ids), fusion_partition="p")
    return PrefillCommand(plan=plan, member=0, input_ids=ids, sampling=SamplingParams(logprobs=True),
                          cached_tokens=cached)


def test_prefill_with_loaded_rows_computes_what_a_full_prefill_computes():
    engine = make_engine(_model())
    ids = [(i * 7 + 3) % 64 for i in range(21)]
    full = engine.prefill(_command("full", ids, 0))
    stored = engine.requests["full"].kv
    cached_rows = 3 * BLOCK
    cached = CachedRows(cached_rows, [stored.keys(i, 0, cached_rows) for i in range(stored.num_layers)],
                        [stored.values(i, 0, cached_rows) for i in range(stored.num_layers)])

    hit = engine.prefill(_command("hit", ids, cached_rows), cached=cached)
    assert hit.cached_tokens == cached_rows and full.cached_tokens == 0
    assert hit.token_id == full.token_id and hit.logprob == pytest.approx(full.logprob, abs=1e-5)
    reused = engine.requests["hit"].kv
    assert reused.tokens == len(ids) and reused.positions == [(0, len(ids))]
    for i in range(stored.num_layers):
        torch.testing.assert_close(reused.keys(i), stored.keys(i), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reused.values(i), stored.values(i), atol=1e-5, rtol=1e-5)

    # Wrong rows change the result: the loaded rows are really used.
    wrong = CachedRows(cached_rows, [torch.randn_like(k) for k in cached.keys],
                       [torch.randn_like(v) for v in cached.values])
    off = engine.prefill(_command("wrong", ids, cached_rows), cached=wrong)
    assert off.logprob != pytest.approx(full.logprob, abs=1e-5)

    # Rows that do not match the member's cached positions are refused, not silently misplaced.
    short = CachedRows(cached_rows, [k[:-1] for k in cached.keys], [v[:-1] for v in cached.values])
    with pytest.raises(ValueError):
        engine.prefill(_command("short", ids, cached_rows), cached=short)


async def test_with_the_kv_store_off_nothing_is_looked_up_or_sent():
    model = ModelInfo(name="m", vocab_size=64, num_layers=2, num_kv_heads=2, head_dim=8,
                      max_position_embeddings=128, dtype="float32")
    # no index client at all: a lookup would fail loudly
    index = PrefixIndex(None, Settings(kv_store_enabled=False), trace.get_tracer("test"))
    async with index.hold("r", model, list(range(100)), "none") as hit:
        assert hit.cached_tokens == 0 and hit.blocks == []
