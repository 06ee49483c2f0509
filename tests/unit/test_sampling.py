import torch

from shared.messages import SamplingParams
from shared.sampling import request_generator, sample, sample_batch, token_seed

PROMPT_TOKENS = 30  # where a request's first sampled token lands


def _run(logits_by_step: list[torch.Tensor], params: SamplingParams, start: int = 0) -> list[int]:
    """Tokens `start`, `start` + 1, ... of a request whose prompt is PROMPT_TOKENS long, drawn as a
    (possibly resumed) run on a worker does: a fresh generator, one sample per position."""
    gen = request_generator(params)
    return [sample(logits_by_step[i], params, gen, PROMPT_TOKENS + i)[0] for i in range(start, len(logits_by_step))]


def test_greedy_takes_argmax_and_reports_model_logprob():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    token, lp = sample(logits, SamplingParams())
    assert token == 1
    assert abs(lp - float(torch.log_softmax(logits, -1)[1])) < 1e-6
    assert request_generator(SamplingParams(seed=3)) is None  # greedy draws nothing


def test_seeded_sampling_is_reproducible_and_respects_top_k_and_top_p():
    torch.manual_seed(0)
    logits = [torch.randn(50)] * 40
    params = SamplingParams(temperature=1.3, top_k=5, seed=7)
    runs = [_run(logits, params) for _ in range(2)]
    assert runs[0] == runs[1]
    assert set(runs[0]) <= set(torch.topk(logits[0], 5).indices.tolist())
    assert len(set(runs[0])) > 1  # really sampling
    # top_p so small only the most likely token survives
    p = SamplingParams(temperature=1.0, top_p=1e-6, seed=1)
    assert set(_run(logits[:20], p)) == {int(torch.argmax(logits[0]))}


def test_token_seed_is_a_stable_63_bit_hash_of_seed_and_position():
    assert token_seed(7, 30) == token_seed(7, 30)  # no per-process salt: workers agree
    seeds = {token_seed(s, p) for s in range(20) for p in range(20)}
    assert len(seeds) == 400  # neighbouring seeds and positions do not collide or shift
    assert all(0 <= s < 2**63 for s in seeds)


def test_a_resumed_run_continues_the_seeded_stream_where_it_stopped():
    """A run resumed after n tokens (a new generator, its first sample at PROMPT_TOKENS + n) draws
    the tokens the undisturbed run drew from its (n+1)-th on."""
    torch.manual_seed(1)
    logits = [torch.randn(64) for _ in range(24)]
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=40, seed=11)
    undisturbed = _run(logits, params)
    for n in (1, 5, 23):
        assert undisturbed[:n] + _run(logits, params, start=n) == undisturbed, n
    assert _run(logits, params.model_copy(update={"seed": 12})) != undisturbed  # the seed matters


def test_a_seeded_row_draws_the_same_alone_and_in_any_batch():
    torch.manual_seed(2)
    logits = torch.randn(3, 64)
    params = [SamplingParams(temperature=0.9, seed=5), SamplingParams(), SamplingParams(temperature=1.1, seed=6)]
    positions = [40, 12, 7]
    batched, _ = sample_batch(logits, params, [request_generator(p) for p in params], positions)
    for b in range(3):
        alone, _ = sample_batch(logits[b : b + 1], [params[b]], [request_generator(params[b])], [positions[b]])
        assert alone == [batched[b]], b
