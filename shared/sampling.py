"""Token sampling from rows of logits: greedy, temperature, top-k, top-p, seeded.

The log-probability reported is the model's (log-softmax of the raw logits), as vLLM reports it,
so it does not depend on the sampling knobs.

Seeded sampling is counter-based: the draw for the token at sequence position p comes from a
generator seeded with token_seed(seed, p), not from one stream advanced step by step. The
randomness of a token therefore depends only on the request's seed and where the token lands,
never on what ran before it on that worker. Two things follow: a request gives the same tokens
alone or in any batch, and a run resumed after a recovery or a preemption (whose prompt is the
original prompt plus the n tokens produced, scheduler/recovery.py) samples its first token, at
position prompt + n, with exactly the draws the undisturbed run used for its (n+1)-th token.
"""

from __future__ import annotations

import hashlib

import torch

from shared.messages import SamplingParams

# token_seed's digest: 8 bytes, of which 63 bits are kept, a seed every torch generator
# (CPU or CUDA) accepts.
SEED_DIGEST_BYTES = 8
SEED_BITS = 63


def token_seed(seed: int, position: int) -> int:
    """The generator seed for the token sampled at sequence `position` of a request seeded with
    `seed`. A hash, not seed + position: neighbouring seeds must not share shifted streams."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=SEED_DIGEST_BYTES).digest()
    return int.from_bytes(digest, "little") & ((1 << SEED_BITS) - 1)


def request_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The generator a seeded sampled request draws with (re-seeded for each token, token_seed);
    None for greedy or unseeded requests (these draw from torch's global generator)."""
    if params.temperature == 0.0 or params.seed is None:
        return None
    return torch.Generator(device=device)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           position: int = 0) -> tuple[int, float]:
    """logits: [vocab] -> (token id, its log-probability under the model); `position`: where the
    sampled token lands in the sequence (what a seeded draw derives from)."""
    (token,), (logprob,) = sample_batch(logits[None], [params], [generator], [position])
    return token, logprob


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                 positions: list[int]) -> tuple[list[int], list[float]]:
    """logits: [B, vocab] -> (token ids, their log-probabilities), one host synchronisation.
    positions[b]: the sequence position row b's token lands at (the prompt's length for a
    prefill's first token, the fed-back token's position + 1 in decode).

    Greedy rows are one argmax over the batch; sampled rows each draw from their own generator,
    seeded for their position (token_seed), with the same operations whatever the batch, so a
    seeded request gives the same tokens alone, batched, or resumed."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, vocab]
    tokens = torch.argmax(logits, dim=-1)  # [B]
    sampled = [b for b, p in enumerate(params) if p.temperature != 0.0]
    if sampled:
        tokens = tokens.clone()
        for b in sampled:
            generator = generators[b]
            if generator is not None and params[b].seed is not None:
                generator.manual_seed(token_seed(params[b].seed, positions[b]))
            tokens[b] = _draw(logits[b], params[b], generator)
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
