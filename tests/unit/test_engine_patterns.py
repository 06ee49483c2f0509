"""A request's attention pattern through the worker engine: prefilled in small ring-of-one chunks
of queries, then decoded in one batch with requests of other patterns, its greedy tokens equal a
dense masked reference decoder's (tests/helpers/checkpoints.py) with the same pattern. A request
whose every layer is windowed gives back its pages behind the window as it prefills chunk by chunk
and decodes, so a prompt far longer than the pool runs, with the same tokens."""

from __future__ import annotations

import pytest
import torch

from services.worker.engine import WorkerEngine
from services.worker.kv_cache import SCRATCH_PAGE, KVPool, KVPoolFull
from shared.attention.kv_need import windowed_kv_tokens
from shared.attention.pattern import KeyPattern
from shared.messages import AttentionSpec, DecodeStep, PrefillCommand, PromptBlock, RingPlan, SamplingParams, Segment
from shared.model import LlamaModel, parse_model_config
from tests.helpers.checkpoints import greedy_generate
from tests.helpers.engines import make_engine, tiny_llama

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


# ---- KV that fits (issue 12 item 4): pages behind the window go back as the request advances ------

LONG_PROMPT, STEP, PAGE, SMALL_POOL_PAGES = 61, 8, 4, 10


def bounded_engine(model, pages: int = SMALL_POOL_PAGES):
    """An engine over a pool that cannot grow, far smaller than the long prompt (16 pages of 4)."""
    pool = KVPool.for_model(model.config, PAGE, pages, torch.float32, torch.device("cpu"))
    return WorkerEngine(model, torch.device("cpu"), torch.float32, pool)


def one_worker_command(rid: str, spec: AttentionSpec | None, n: int = LONG_PROMPT) -> PrefillCommand:
    plan = RingPlan(request_id=rid, workers=["w"], world_ranks=[0], world_generation=0, chunk_tokens=n,
                    segments=[[Segment(start=0, end=n)]], prompt_tokens=n, fusion_partition="p")
    return PrefillCommand(plan=plan, member=0, input_ids=(ids_of(rid) * 3)[:n], sampling=SamplingParams(), attention=spec)


def lowest_free(pool: KVPool) -> list[int]:
    """Tracks the fewest free pages the pool has had (right after each allocation)."""
    low, alloc = [pool.free_pages], pool.alloc

    def tracked(n: int) -> list[int]:
        taken = alloc(n)
        low[0] = min(low[0], pool.free_pages)
        return taken

    pool.alloc = tracked
    return low


def chunked_then_decoded(engine, cmd: PrefillCommand) -> tuple[list[int], list[int]]:
    """(greedy tokens, pages given back after each chunk) of a chunked prefill and its decode."""
    state = engine.prefill_begin(cmd)
    freed_after_chunk = []
    while not state.finished:
        engine.prefill_chunk(state, STEP)
        freed_after_chunk.append(state.kv.freed_pages)
    tokens = [engine.prefill_end(state).token_id]
    for step in range(NEW_TOKENS - 1):
        (r,) = engine.decode([DecodeStep(request_id=cmd.plan.request_id, step=step, token_id=tokens[-1],
                                         position=cmd.plan.prompt_tokens + step, append_member=0,
                                         sampling=SamplingParams())], never_fuse, importance_every=2)
        assert r.ok, r
        tokens.append(r.token_id)
    return tokens, freed_after_chunk


@pytest.mark.parametrize("spec", [AttentionSpec(mode="sliding", window=6), AttentionSpec(mode="hybrid", window=6, sinks=3)],
                         ids=["sliding", "hybrid"])
def test_a_windowed_request_frees_behind_its_window_while_it_prefills_and_decodes(spec):
    model = tiny_model()
    engine = bounded_engine(model)
    pool, cmd = engine.pool, one_worker_command("r", spec)
    assert pool.pages_for(LONG_PROMPT + NEW_TOKENS) > pool.pages  # all of it would never fit
    low = lowest_free(pool)
    tokens, freed_after_chunk = chunked_then_decoded(engine, cmd)

    assert tokens == greedy_generate(model, cmd.input_ids, NEW_TOKENS, spec.key_pattern())
    kv = engine.requests["r"].kv
    assert freed_after_chunk[0] == 0 and freed_after_chunk == sorted(freed_after_chunk)  # freed as it went
    assert freed_after_chunk[-1] > 0 and kv.freed_pages > freed_after_chunk[-1]  # and on in decode
    # never more than the rule admission uses: sinks + window + a chunk, and a partial page at each end
    bound = windowed_kv_tokens(spec.key_pattern(), STEP, PAGE)
    assert (pool.pages - low[0]) * PAGE <= bound
    # held now: the sink page (hybrid) and the pages of the window
    held = [p for p in kv.pages if p != SCRATCH_PAGE]
    assert pool.free_pages == pool.pages - len(held) and len(kv.pages) == pool.pages_for(kv.tokens)
    assert engine.kv_tokens == kv.held_tokens <= spec.window + (1 + bool(spec.sinks)) * PAGE
    engine.release("r")
    assert pool.free_pages == pool.pages


def test_a_full_attention_request_of_that_length_does_not_fit_the_same_pool():
    engine = bounded_engine(tiny_model())
    with pytest.raises(KVPoolFull):
        engine.prefill_begin(one_worker_command("r", None))
    assert engine.pool.free_pages == engine.pool.pages


def test_a_model_whose_every_layer_slides_frees_behind_its_window_and_strided_or_mixed_keep_every_page():
    mistral = tiny_llama(vocab=64, model_type="mistral", sliding_window=5)
    engine = bounded_engine(mistral)
    tokens, freed = chunked_then_decoded(engine, one_worker_command("m", None))
    assert freed[-1] > 0
    assert tokens == greedy_generate(mistral, one_worker_command("m", None).input_ids, NEW_TOKENS, KeyPattern(window=5))

    # a prompt whose blocks go to the prefix cache keeps them (a store reads them after the prefill)
    cmd = one_worker_command("cached", None, n=2 * PAGE)
    cmd.kv_blocks = [PromptBlock(index=0, start=0, end=PAGE, chain_hash="a", parent_hash=""),
                     PromptBlock(index=1, start=PAGE, end=2 * PAGE, chain_hash="b", parent_hash="a")]
    kept = bounded_engine(mistral)
    kept.prefill(cmd)
    assert kept.requests["cached"].window is None and kept.requests["cached"].kv.freed_pages == 0

    strided = bounded_engine(tiny_model(), pages=64)
    chunked_then_decoded(strided, one_worker_command("s", AttentionSpec(mode="strided", window=6, stride=5)))
    assert strided.requests["s"].kv.freed_pages == 0  # strided keys reach back to position 0

    qwen = sharpened({"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                      "max_position_embeddings": 128, "sliding_window": 5, "use_sliding_window": True,
                      "max_window_layers": 1}, seed=2)
    mixed = bounded_engine(qwen, pages=64)
    chunked_then_decoded(mixed, one_worker_command("q", None))
    assert mixed.requests["q"].kv.freed_pages == 0  # layer 0 attends over every row
