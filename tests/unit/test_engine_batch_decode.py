"""Batched decode computes what per-request decode computes.

The worker's decode loop hands the engine every request decoding there at once; the engine runs
them as one batch through the layers (one paged attention call per layer). Here the same requests
are prefilled on two engines with single-worker plans, then decoded batched on one and one
request per call on the other. A request held by one worker has nothing to merge with: the
fusion service is never asked."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers.engines import make_engine
from services.worker.engine import WorkerEngine
from shared.messages import (
    DecodeStep,
    PrefillCommand,
    RingPlan,
    SamplingParams,
    Segment,
)
from shared.model import LlamaModel, parse_model_config

PROMPTS = {"a": 5, "b": 11, "c": 19}  # prompt lengths
SAMPLING = {
    "a": SamplingParams(logprobs=True),  # greedy
    "b": SamplingParams(logprobs=True),
    "c": SamplingParams(temperature=0.9, top_k=20, seed=7, logprobs=True),  # its own generator
}
STEPS = 6
TOLERANCE = 1e-5


def tiny_model(rope_type: str) -> LlamaModel:
    raw = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 16}
    if rope_type == "dynamic":  # frequencies depend on each request's own sequence length
        raw["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    torch.manual_seed(0)
    model = LlamaModel(parse_model_config(raw)).eval()
    with torch.no_grad():  # larger logits than the default init: a wrong row changes the token
        model.lm_head.weight.mul_(8)
    return model


class RecordingModel:
    """The model, with every logits call recorded (the engine only returns token and logprob)."""

    def __init__(self, model: LlamaModel):
        self._model = model
        self.seen: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = self._model.logits(h)
        self.seen.append(out.clone())
        return out


def never_fuse(partials):
    raise AssertionError("a request held by one worker went to the fusion service")


def ids_of(request_id: str) -> list[int]:
    salt = ord(request_id)
    return [(i * 7 + salt) % 64 for i in range(PROMPTS[request_id])]


def prefill_all(engine: WorkerEngine) -> dict[str, int]:
    """Prefill every request on a ring of one; their first tokens."""
    first = {}
    for rid, n in PROMPTS.items():
        plan = RingPlan(request_id=rid, workers=["w"], world_ranks=[0], world_generation=0, chunk_tokens=n,
                        segments=[[Segment(start=0, end=n)]], prompt_tokens=n, fusion_partition="p")
        result = engine.prefill(PrefillCommand(plan=plan, member=0, input_ids=ids_of(rid), sampling=SAMPLING[rid]))
        first[rid] = result.token_id
    return first


def step_of(rid: str, step: int, token: int) -> DecodeStep:
    return DecodeStep(request_id=rid, step=step, token_id=token, position=PROMPTS[rid] + step, append_member=0,
                      sampling=SAMPLING[rid])


@pytest.mark.parametrize("rope_type", ["default", "dynamic"])
def test_batched_decode_equals_one_request_at_a_time(rope_type):
    model = tiny_model(rope_type)
    batched_model, single_model = RecordingModel(model), RecordingModel(model)
    batched = make_engine(batched_model)
    single = make_engine(single_model)

    first_b, first_s = prefill_all(batched), prefill_all(single)
    assert first_b == first_s
    last_b, last_s = dict(first_b), dict(first_s)
    tokens_b = {rid: [] for rid in PROMPTS}
    tokens_s = {rid: [] for rid in PROMPTS}
    logprobs_b, logprobs_s = {}, {}
    logits_b, logits_s = {}, {}
    order = list(PROMPTS)
    for step in range(STEPS):
        if step % 2:  # the batch order follows the queue, not the request: vary it
            order = order[::-1]
        batched_model.seen.clear()
        results = batched.decode([step_of(rid, step, last_b[rid]) for rid in order], never_fuse,
                                 importance_every=1)
        assert [r.request_id for r in results] == order and all(r.ok for r in results)
        (rows,) = batched_model.seen  # one logits call for the whole batch
        assert rows.shape[0] == len(order)
        for rid, result, logits in zip(order, results, rows):
            last_b[rid] = result.token_id
            tokens_b[rid].append(result.token_id)
            logprobs_b[rid, step], logits_b[rid, step] = result.logprob, logits
        for rid in sorted(PROMPTS):  # one request per call, in a fixed order
            single_model.seen.clear()
            (result,) = single.decode([step_of(rid, step, last_s[rid])], never_fuse, importance_every=1)
            assert result.ok and len(single_model.seen) == 1
            last_s[rid] = result.token_id
            tokens_s[rid].append(result.token_id)
            logprobs_s[rid, step], logits_s[rid, step] = result.logprob, single_model.seen[0][0]

    assert tokens_b == tokens_s
    assert len({t for ts in tokens_b.values() for t in ts}) > 1  # not one token over and over
    for key in logits_s:
        torch.testing.assert_close(logits_b[key], logits_s[key], atol=TOLERANCE, rtol=TOLERANCE, msg=str(key))
        assert logprobs_b[key] == pytest.approx(logprobs_s[key], abs=TOLERANCE)
    # and what stays behind: the K/V every step appended, the H2O mass of sampled steps
    for rid, n in PROMPTS.items():
        kv_b, kv_s = batched.requests[rid].kv, single.requests[rid].kv
        assert kv_b.tokens == kv_s.tokens == n + STEPS and kv_b.positions == kv_s.positions == [(0, n + STEPS)]
        for layer in range(model.config.num_hidden_layers):
            torch.testing.assert_close(kv_b.keys(layer), kv_s.keys(layer), atol=TOLERANCE, rtol=TOLERANCE)
            torch.testing.assert_close(kv_b.values(layer), kv_s.values(layer), atol=TOLERANCE, rtol=TOLERANCE)
        assert kv_b.mass.sum() > 0
        torch.testing.assert_close(kv_b.mass, kv_s.mass, atol=TOLERANCE, rtol=TOLERANCE)


def test_decode_continues_a_reference_forward_over_the_whole_sequence():
    """The paged decode of a request equals the plain model run over prompt + generated tokens
    (attention over every earlier position, no cache): pages, slots and rope are right."""
    model = tiny_model("default")
    engine = make_engine(model)
    tokens = [prefill_all(engine)["b"]]
    for step in range(STEPS):
        (result,) = engine.decode([step_of("b", step, tokens[-1])], never_fuse)
        tokens.append(result.token_id)
    ids = ids_of("b") + tokens
    with torch.no_grad():
        logits = model.forward(torch.tensor(ids), torch.arange(len(ids)), _causal_attention(model))
    assert torch.argmax(logits[PROMPTS["b"] - 1 :], dim=-1).tolist()[: len(tokens)] == tokens


def _causal_attention(model):
    def attend(layer, q, k, v):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * model.attn_scale
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril()
        return torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
    return attend


def test_released_requests_give_their_pages_back():
    engine = make_engine(tiny_model("default"))
    prefill_all(engine)  # more pages than the pool had at first: it grew
    assert engine.pool.free_pages < engine.pool.pages
    held = engine.requests["a"].kv
    assert held.acquire()  # a reader on another thread (a prefix store) still reads these rows
    for rid in PROMPTS:
        engine.release(rid)
    assert engine.pool.free_pages == engine.pool.pages - len(held.pages) and engine.kv_tokens == 0
    held.unacquire()
    assert engine.pool.free_pages == engine.pool.pages and not held.acquire()


def test_a_prefill_in_mlp_slices_computes_what_one_pass_computes():
    model = tiny_model("default")
    whole, sliced = make_engine(model), make_engine(model, finish_chunk_tokens=3)
    assert prefill_all(whole) == prefill_all(sliced)
    for rid in PROMPTS:
        torch.testing.assert_close(sliced.requests[rid].kv.keys(2), whole.requests[rid].kv.keys(2),
                                   atol=TOLERANCE, rtol=TOLERANCE)


def test_a_growable_pool_stops_at_its_limit():
    from services.worker.kv_cache import KVPool, KVPoolFull

    pool = KVPool(2, kv_heads=2, head_dim=4, page_tokens=4, pages=2, dtype=torch.float32,
                  device=torch.device("cpu"), growable=True, max_pages=5)
    first = pool.alloc(4)  # grows past its start
    assert pool.pages == 5 and len(first) == 4
    with pytest.raises(KVPoolFull):
        pool.alloc(2)
    assert len(pool.alloc(1)) == 1 and pool.free_pages == 0


def test_a_cpu_worker_knows_its_memory():
    from services.worker.capacity import free_device_bytes

    free = free_device_bytes(torch.device("cpu"))
    if os.path.exists("/proc/meminfo"):  # Linux: the host's available memory
        assert free > 0
    else:
        assert free is None


def test_a_failing_ring_merge_fails_its_request_only():
    from shared.bus import BusError
    from shared.messages import ErrorCode

    engine = make_engine(tiny_model("default"))
    first = prefill_all(engine)
    ring = engine.requests["c"]  # as if "c" were spread over a ring of two, this worker its leader
    ring.plan = ring.plan.model_copy(update={"workers": ["w", "v"], "world_ranks": [0, 1],
                                             "segments": [ring.plan.segments[0], []]})

    def lost_fusion(partials):
        raise BusError("no responders on ringserve.internal.v1.fusion.p.partials")

    results = engine.decode([step_of(rid, 0, first[rid]) for rid in PROMPTS], lost_fusion)
    by_id = {r.request_id: r for r in results}
    assert by_id["a"].ok and by_id["b"].ok and by_id["a"].token_id is not None
    assert not by_id["c"].ok and by_id["c"].error_code == ErrorCode.UNAVAILABLE and "no responders" in by_id["c"].error


def test_a_step_of_a_request_released_meanwhile_fails_alone():
    """A release (cancel, drain) can reach the compute thread between the batch's forming and its
    step: that request's row fails, the others decode."""
    model = tiny_model("default")
    engine = make_engine(model)
    first = prefill_all(engine)
    engine.release("b")
    results = engine.decode([step_of(rid, 0, first[rid]) for rid in PROMPTS], never_fuse)
    by_id = {r.request_id: r for r in results}
    assert not by_id["b"].ok and by_id["b"].error_code is not None
    assert by_id["a"].ok and by_id["c"].ok
