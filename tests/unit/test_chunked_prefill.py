"""Chunked prefill of a request one worker holds: the K/V rows, the first token and the decode
after it equal a one-pass prefill's, for any chunk size, with a loaded prefix, with a sliding
window; an abort between chunks gives the pages back."""

import pytest
import torch

from services.worker.chunked_prefill import one_worker_positions
from services.worker.errors import PrefillAborted
from services.worker.kv_cache import CachedRows
from shared.messages import PrefillCommand, RingPlan, SamplingParams, Segment
from tests.helpers.engines import make_engine, tiny_llama

PROMPT = 37


def tiny_model(window: int | None = None):
    return tiny_llama() if window is None else tiny_llama(model_type="mistral", sliding_window=window)


def command(rid: str, n: int = PROMPT) -> PrefillCommand:
    plan = RingPlan(request_id=rid, workers=["w"], world_ranks=[0], world_generation=0, chunk_tokens=n,
                    segments=[[Segment(start=0, end=n)]], prompt_tokens=n, fusion_partition="p")
    return PrefillCommand(plan=plan, member=0, input_ids=[(i * 7 + 3) % 97 for i in range(n)],
                          sampling=SamplingParams())


def chunked(engine, cmd, step, cached=None):
    state = engine.prefill_begin(cmd, cached)
    while not state.finished:
        engine.prefill_chunk(state, step)
    return engine.prefill_end(state)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("step", [1, 6, 16, PROMPT])
def test_chunks_compute_what_one_pass_computes(window, step):
    model = tiny_model(window)
    whole, parts = make_engine(model), make_engine(model)
    cmd = command("r")
    assert one_worker_positions(cmd)
    first = whole.prefill(cmd)
    got = chunked(parts, cmd, step)
    assert got.token_id == first.token_id and got.logprob == pytest.approx(first.logprob, abs=1e-5)
    a, b = whole.requests["r"].kv, parts.requests["r"].kv
    assert a.tokens == b.tokens == PROMPT and a.positions == b.positions
    for layer in range(2):
        torch.testing.assert_close(b.keys(layer), a.keys(layer), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.values(layer), a.values(layer), rtol=1e-5, atol=1e-6)


def test_a_loaded_prefix_is_kept_and_the_rest_computed_in_chunks():
    model = tiny_model()
    whole, parts = make_engine(model), make_engine(model)
    cmd = command("r")
    first = whole.prefill(cmd)
    kv = whole.requests["r"].kv
    upto = 16
    cached = CachedRows(upto, [kv.keys(i, 0, upto) for i in range(2)], [kv.values(i, 0, upto) for i in range(2)])
    got = chunked(parts, cmd, 5, cached)
    assert got.token_id == first.token_id and got.cached_tokens == upto
    torch.testing.assert_close(parts.requests["r"].kv.keys(1), kv.keys(1), rtol=1e-5, atol=1e-6)


def test_an_abort_between_chunks_gives_the_pages_back():
    engine = make_engine(tiny_model())
    free = engine.pool.free_pages
    state = engine.prefill_begin(command("r"))
    engine.prefill_chunk(state, 8)
    with pytest.raises(PrefillAborted):
        engine.prefill_chunk(state, 8, should_abort=lambda: True)
    assert "r" not in engine.requests and engine.pool.free_pages >= free


def test_only_a_whole_prompt_on_one_worker_is_chunked():
    cmd = command("r")
    ring = cmd.model_copy(update={"plan": cmd.plan.model_copy(update={
        "workers": ["a", "b"], "world_ranks": [0, 1], "segments": [[Segment(start=0, end=20)], [Segment(start=20, end=PROMPT)]]})})
    assert not one_worker_positions(ring)
