"""Token sampling from rows of logits: greedy, temperature, top-k, top-p, seeded.

The log-probability reported is the model's (log-softmax of the raw logits), as vLLM reports it,
so it does not depend on the sampling knobs.
"""

from __future__ import annotations

import torch

from shared.messages import SamplingParams


def request_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """One generator per request: the same seed gives the same tokens."""
    if params.temperature == 0.0 or params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> tuple[int, float]:
    """logits: [vocab] -> (token id, its log-probability under the model)."""
    (token,), (logprob,) = sample_batch(logits[None], [params], [generator])
    return token, logprob


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> tuple[list[int], list[float]]:
    """logits: [B, vocab] -> (token ids, their log-probabilities), one host synchronisation.

    Greedy rows are one argmax over the batch; sampled rows each draw from their own generator,
    with the same operations whatever the batch, so a seeded request gives the same tokens alone
    or batched."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, vocab]
    tokens = torch.argmax(logits, dim=-1)  # [B]
    sampled = [b for b, p in enumerate(params) if p.temperature != 0.0]
    if sampled:
        tokens = tokens.clone()
        for b in sampled:
            tokens[b] = _draw(logits[b], params[b], generators[b])
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    return tokens.tolist(), chosen.tolist()


def _draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One sampled token (a 1-element tensor, left on the device) from logits [vocab] float32."""
    scores = logits / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop tokens once the mass before them already reaches top_p (the first always stays).
        drop = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
