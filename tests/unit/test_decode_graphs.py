"""The decode step replayed from CUDA graphs computes what the eager step computes (GPU only)."""

from __future__ import annotations

import pytest
import torch

from services.worker.engine import WorkerEngine
from services.worker.graphs import DecodeGraphs, buckets_up_to
from services.worker.kv_cache import KVPool
from shared.messages import AttentionSpec, DecodeStep, PrefillCommand, RingPlan, SamplingParams, Segment
from shared.model import LlamaModel, parse_model_config
from shared.settings import Settings

PROMPTS = {"a": 37, "b": 100, "c": 260}
STEPS = 8
PAGE = 16


def test_buckets_cover_every_batch_size():
    assert buckets_up_to(1) == [1]
    assert buckets_up_to(6) == [1, 2, 4, 6]
    assert buckets_up_to(64) == [1, 2, 4, 8, 16, 32, 64]


def _model(device, dtype, window=None):
    raw = {"model_type": "llama", "vocab_size": 128, "hidden_size": 256, "intermediate_size": 512,
           "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
           "max_position_embeddings": 1024}
    if window is not None:  # Mistral-style: every layer slides
        raw.update(model_type="mistral", sliding_window=window)
    torch.manual_seed(0)
    model = LlamaModel(parse_model_config(raw)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model.to(device=device, dtype=dtype)


def _engine(model, graphs: bool) -> WorkerEngine:
    device, dtype = torch.device("cuda"), torch.bfloat16
    settings = Settings(device="cuda", kv_block_tokens=PAGE, decode_max_batch=4, max_prompt_tokens=512,
                        max_new_tokens_limit=64)
    pool = KVPool.for_model(model.config, PAGE, 256, dtype, device)
    return WorkerEngine(model, device, dtype, pool, graphs=DecodeGraphs(model, pool, settings) if graphs else None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window, patterns", [(None, False), (40, False), (None, True), (40, True)])
def test_graph_replay_equals_the_eager_step(window, patterns):
    """With `patterns`, request a slides with its own window (in the graphs: the window starts of
    every layer) and b is hybrid (its sink rows: an eager batch of its own beside the graphs)."""
    model = _model("cuda", torch.bfloat16, window)
    request_window = window or 24
    attention = {"a": AttentionSpec(mode="sliding", window=request_window),
                 "b": AttentionSpec(mode="hybrid", window=request_window, sinks=3)} if patterns else {}
    runs = {}
    for graphs in (True, False):
        engine = _engine(model, graphs)
        last = {}
        for rid, n in PROMPTS.items():
            plan = RingPlan(request_id=rid, workers=["w"], world_ranks=[0], world_generation=0, chunk_tokens=n,
                            segments=[[Segment(start=0, end=n)]], prompt_tokens=n, fusion_partition="p")
            ids = [(i * 7 + ord(rid)) % 128 for i in range(n)]
            sampling = SamplingParams(temperature=0.8, seed=5) if rid == "c" else SamplingParams()
            last[rid] = engine.prefill(PrefillCommand(plan=plan, member=0, input_ids=ids, sampling=sampling,
                                                      attention=attention.get(rid))).token_id
        tokens, logprobs = {rid: [] for rid in PROMPTS}, {rid: [] for rid in PROMPTS}
        for step in range(STEPS):
            order = list(PROMPTS)[: 1 + step % 3]  # batches of 1, 2, 3 (padded to 4)
            steps = [DecodeStep(request_id=rid, step=len(tokens[rid]), token_id=last[rid],
                                position=PROMPTS[rid] + len(tokens[rid]), append_member=0,
                                sampling=SamplingParams()) for rid in order]
            for rid, result in zip(order, engine.decode(steps, fuse=None, importance_every=2)):
                last[rid] = result.token_id
                tokens[rid].append(result.token_id)
                logprobs[rid].append(result.logprob)
        runs[graphs] = tokens, logprobs, {rid: engine.requests[rid].kv for rid in PROMPTS}
    (tok_g, lp_g, kv_g), (tok_e, lp_e, kv_e) = runs[True], runs[False]
    # greedy rows are sampled inside the graph; the seeded row from the graph's logits, outside it
    assert tok_g["a"] == tok_e["a"] and tok_g["b"] == tok_e["b"]
    assert len(tok_g["c"]) == len(tok_e["c"]) and all(0 <= t < 128 for t in tok_g["c"])
    for rid in ("a", "b"):
        assert lp_g[rid] == pytest.approx(lp_e[rid], abs=5e-2)
    for rid in PROMPTS:
        assert kv_g[rid].tokens == kv_e[rid].tokens == PROMPTS[rid] + len(tok_g[rid])
    torch.testing.assert_close(kv_g["a"].keys(0), kv_e["a"].keys(0), atol=2e-2, rtol=2e-2)
    # H2O importance: the graphs' recording steps measure what the eager observed steps measure
    for rid in PROMPTS:
        assert float(kv_g[rid].mass.sum()) > 0
        torch.testing.assert_close(kv_g[rid].mass, kv_e[rid].mass, atol=2e-2, rtol=2e-2)
