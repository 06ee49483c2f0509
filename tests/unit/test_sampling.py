import torch

from shared.messages import SamplingParams
from shared.sampling import request_generator, sample


def test_greedy_takes_argmax_and_reports_model_logprob():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    token, lp = sample(logits, SamplingParams())
    assert token == 1
    assert abs(lp - float(torch.log_softmax(logits, -1)[1])) < 1e-6


def test_seeded_sampling_is_reproducible_and_respects_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(50)
    params = SamplingParams(temperature=1.3, top_k=5, seed=7)
    runs = []
    for _ in range(2):
        gen = request_generator(params)
        runs.append([sample(logits, params, gen)[0] for _ in range(40)])
    assert runs[0] == runs[1]
    assert set(runs[0]) <= set(torch.topk(logits, 5).indices.tolist())
    assert len(set(runs[0])) > 1  # really sampling
    # top_p so small only the most likely token survives
    p = SamplingParams(temperature=1.0, top_p=1e-6, seed=1)
    gen = request_generator(p)
    assert {sample(logits, p, gen)[0] for _ in range(20)} == {int(torch.argmax(logits))}
