"""A request's attention pattern through the worker engine: prefilled in small ring-of-one chunks
of queries, then decoded in one batch with requests of other patterns, its greedy tokens equal a
dense masked reference decoder's (tests/helpers/checkpoints.py) with the same pattern."""

from __future__ import annotations

import pytest
import torch

from shared.attention.pattern import KeyPattern
from shared.messages import AttentionSpec, DecodeStep, PrefillCommand, RingPlan, SamplingParams, Segment
from shared.model import LlamaModel, parse_model_config
from tests.helpers.checkpoints import greedy_generate
from tests.helpers.engines import make_engine

PROMPT_TOKENS = 23
NEW_TOKENS = 8
SPECS = {  # request id -> its attention (None: full)
    "full": None,
    "sliding": AttentionSpec(mode="sliding", window=4),
    "hybrid": AttentionSpec(mode="hybrid", window=4, sinks=3),
    "strided": AttentionSpec(mode="strided", window=3, stride=5),
}


# Larger than the default init: sharp attention and logits, so a wrong key changes the token.
ATTENTION_GAIN, LOGITS_GAIN = 3.0, 8.0


def sharpened(raw: dict, seed: int) -> LlamaModel:
    torch.manual_seed(seed)
    model = LlamaModel(parse_model_config(raw)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(p in name for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
                param.mul_(ATTENTION_GAIN)
        model.lm_head.weight.mul_(LOGITS_GAIN)
    return model


def tiny_model() -> LlamaModel:
    return sharpened({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "max_position_embeddings": 64}, seed=1)


def ids_of(rid: str) -> list[int]:
    return [(i * 11 + len(rid)) % 61 + 2 for i in range(PROMPT_TOKENS)]


def never_fuse(partials):
    raise AssertionError("a request held by one worker went to the fusion service")


def test_each_requests_pattern_holds_in_prefill_and_in_a_mixed_decode_batch():
    model = tiny_model()
    engine = make_engine(model)
    last, got = {}, {rid: [] for rid in SPECS}
    for rid, spec in SPECS.items():
        plan = RingPlan(request_id=rid, workers=["w"], world_ranks=[0], world_generation=0, chunk_tokens=5,
                        segments=[[Segment(start=0, end=PROMPT_TOKENS)]], prompt_tokens=PROMPT_TOKENS,
                        fusion_partition="p")
        result = engine.prefill(PrefillCommand(plan=plan, member=0, input_ids=ids_of(rid), sampling=SamplingParams(),
                                               attention=spec))
        last[rid] = result.token_id
        got[rid].append(result.token_id)
    for step in range(NEW_TOKENS - 1):
        steps = [DecodeStep(request_id=rid, step=step, token_id=last[rid], position=PROMPT_TOKENS + step,
                            append_member=0, sampling=SamplingParams()) for rid in SPECS]
        results = engine.decode(steps, never_fuse, importance_every=2)
        assert all(r.ok for r in results), results
        for rid, r in zip(SPECS, results):
            last[rid] = r.token_id
            got[rid].append(r.token_id)
    for rid, spec in SPECS.items():
        pattern = spec.key_pattern() if spec is not None else None
        assert got[rid] == greedy_generate(model, ids_of(rid), NEW_TOKENS, pattern), rid
    # the patterns matter here: the same prompt under full attention decodes otherwise
    for rid in ("sliding", "hybrid", "strided"):
        assert greedy_generate(model, ids_of(rid), NEW_TOKENS) != got[rid], rid


@pytest.mark.parametrize("window", [3, 6])
def test_a_hybrid_pattern_on_a_model_with_its_own_window_applies_in_every_layer(window):
    """Qwen2-style: layer 1 slides with the model's window, layer 0 does not; a request's pattern
    (same window, plus sinks) runs in both."""
    raw = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 64, "sliding_window": window, "use_sliding_window": True,
           "max_window_layers": 1}
    model = sharpened(raw, seed=2)
    assert model.config.sliding_layers == (1,)
    engine = make_engine(model)
    spec = AttentionSpec(mode="hybrid", window=window, sinks=2)
    plan = RingPlan(request_id="r", workers=["w"], world_ranks=[0], world_generation=0, chunk_tokens=5,
                    segments=[[Segment(start=0, end=PROMPT_TOKENS)]], prompt_tokens=PROMPT_TOKENS, fusion_partition="p")
    ids = ids_of("r")
    tokens = [engine.prefill(PrefillCommand(plan=plan, member=0, input_ids=ids, sampling=SamplingParams(),
                                            attention=spec)).token_id]
    for step in range(NEW_TOKENS - 1):
        (r,) = engine.decode([DecodeStep(request_id="r", step=step, token_id=tokens[-1], position=PROMPT_TOKENS + step,
                                         append_member=0, sampling=SamplingParams())], never_fuse)
        tokens.append(r.token_id)
    assert tokens == greedy_generate(model, ids, NEW_TOKENS, KeyPattern(window=window, sinks=2))
    assert tokens != greedy_generate(model, ids, NEW_TOKENS, KeyPattern(window=window))  # the sinks matter
