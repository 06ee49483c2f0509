"""Batched decode computes what per-request decode computes.

The worker's decode loop hands the engine every step queued at once; the engine runs them as one
batch through the layers. Here the same requests are prefilled on two engines with single-worker
plans, then decoded batched on one and one request per call on the other. The fusion service is
the real one without NATS: its FusionTable merges each layer's partials in process (for a ring
of one, the degenerate merge the fusion service does)."""

from __future__ import annotations

import pytest
import torch

from services.fusion.table import FusionTable
from services.worker.engine import WorkerEngine
from shared.messages import (
    DecodeStep,
    FusionRequest,
    MergedItem,
    PartialItem,
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


class InProcessFusion:
    """fuse() for the engine: the fusion service's table, every merge recorded by (request, step, layer)."""

    def __init__(self):
        self.table = FusionTable(timeout_s=60)
        self.merged: dict[tuple[str, int, int], MergedItem] = {}

    def __call__(self, partials: list[PartialItem]) -> list[MergedItem]:
        assert all(p.parts == 1 for p in partials)
        replies = self.table.add(FusionRequest(worker_id="w", items=partials), token="w")
        assert len(replies) == 1 and replies[0][1].error is None
        items = replies[0][1].items
        for item in items:
            self.merged[(item.request_id, item.step, item.layer)] = item
        return items


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
    batched = WorkerEngine(batched_model, torch.device("cpu"), torch.float32)
    single = WorkerEngine(single_model, torch.device("cpu"), torch.float32)
    batched_fusion, single_fusion = InProcessFusion(), InProcessFusion()

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
        results = batched.decode([step_of(rid, step, last_b[rid]) for rid in order], batched_fusion,
                                 importance_every=2)
        assert [r.request_id for r in results] == order and all(r.ok for r in results)
        assert len(batched_model.seen) == len(order)
        for rid, result, logits in zip(order, results, batched_model.seen):
            last_b[rid] = result.token_id
            tokens_b[rid].append(result.token_id)
            logprobs_b[rid, step], logits_b[rid, step] = result.logprob, logits
        for rid in sorted(PROMPTS):  # one request per call, in a fixed order
            single_model.seen.clear()
            (result,) = single.decode([step_of(rid, step, last_s[rid])], single_fusion, importance_every=2)
            assert result.ok and len(single_model.seen) == 1
            last_s[rid] = result.token_id
            tokens_s[rid].append(result.token_id)
            logprobs_s[rid, step], logits_s[rid, step] = result.logprob, single_model.seen[0]

    assert tokens_b == tokens_s
    assert len({t for ts in tokens_b.values() for t in ts}) > 1  # not one token over and over
    for key in logits_s:
        torch.testing.assert_close(logits_b[key], logits_s[key], atol=TOLERANCE, rtol=TOLERANCE, msg=str(key))
        assert logprobs_b[key] == pytest.approx(logprobs_s[key], abs=TOLERANCE)
    # every layer's attention output (the fused result each layer continues from)
    assert batched_fusion.merged.keys() == single_fusion.merged.keys()
    assert len(single_fusion.merged) == len(PROMPTS) * STEPS * model.config.num_hidden_layers
    for key, merged in single_fusion.merged.items():
        torch.testing.assert_close(batched_fusion.merged[key].out, merged.out, atol=TOLERANCE, rtol=TOLERANCE,
                                   msg=str(key))
        torch.testing.assert_close(batched_fusion.merged[key].lse, merged.lse, atol=TOLERANCE, rtol=TOLERANCE,
                                   msg=str(key))
    # and what stays behind: the K/V every step appended, the H2O mass of sampled steps
    for rid, n in PROMPTS.items():
        kv_b, kv_s = batched.requests[rid].kv, single.requests[rid].kv
        assert kv_b.tokens == kv_s.tokens == n + STEPS and kv_b.positions == kv_s.positions == [(0, n + STEPS)]
        for layer_b, layer_s in zip(kv_b.layers, kv_s.layers):
            torch.testing.assert_close(layer_b.keys(), layer_s.keys(), atol=TOLERANCE, rtol=TOLERANCE)
            torch.testing.assert_close(layer_b.values(), layer_s.values(), atol=TOLERANCE, rtol=TOLERANCE)
        assert kv_b.mass.sum() > 0
        torch.testing.assert_close(kv_b.mass, kv_s.mass, atol=TOLERANCE, rtol=TOLERANCE)
