"""Our loader + model against transformers on tiny random checkpoints that transformers itself wrote."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config

from shared.model import ensure_demo_checkpoint, load_model
from tests.helpers.checkpoints import (
    full_sequence_logits,
    greedy_generate,
    hf_greedy_generate,
    save_tiny_checkpoint,
    tiny_dims,
)

# float32 logits of the same maths in a different order of operations
LOGITS_RTOL = 1e-5
NEW_TOKENS = 24
GEN_PROMPT_TOKENS = 8
# Longer than the dynamic case's max_position_embeddings, so NTK scaling is active in the logits test.
LOGITS_PROMPT_TOKENS = 24
# A random model whose greedy output has fewer distinct tokens would make the comparison weak.
MIN_DISTINCT_GENERATED = 4
# The demo model answers these bytes with its eos token after 18 others.
DEMO_EOS_PROMPT = list(range(40, 48))

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    "llama-llama3": lambda: LlamaConfig(**tiny_dims(rope_parameters=LLAMA3_ROPE)),
    "llama-linear": lambda: LlamaConfig(**tiny_dims(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    # max_position_embeddings 16 < the generated length: the base stretches step by step
    "llama-dynamic": lambda: LlamaConfig(**tiny_dims(
        max_position_embeddings=16,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})),
    "llama-yarn": lambda: LlamaConfig(**tiny_dims(
        max_position_embeddings=64,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 16})),
    "llama-bias-wide-heads": lambda: LlamaConfig(**tiny_dims(attention_bias=True, mlp_bias=True, head_dim=32)),
    "llama-mqa": lambda: LlamaConfig(**tiny_dims(num_key_value_heads=1, rope_theta=500000.0)),
    "qwen2": lambda: Qwen2Config(**tiny_dims()),
    "qwen2-tied": lambda: Qwen2Config(**tiny_dims(tie_word_embeddings=True)),
    "mistral": lambda: MistralConfig(**tiny_dims(sliding_window=4096)),
}


@pytest.fixture(params=sorted(CASES))
def checkpoint(request, tmp_path):
    hf_model = save_tiny_checkpoint(CASES[request.param](), tmp_path, seed=len(request.param))
    return request.param, hf_model, tmp_path


def _prompt(length: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_logits_match_transformers(checkpoint):
    _name, hf_model, path = checkpoint
    ours = load_model(path)
    ids = _prompt(LOGITS_PROMPT_TOKENS, ours.config.vocab_size)
    with torch.inference_mode():
        theirs = hf_model(torch.tensor([ids])).logits[0].float()
    got = full_sequence_logits(ours, ids)
    torch.testing.assert_close(got, theirs, rtol=LOGITS_RTOL, atol=LOGITS_RTOL * theirs.abs().max().item())


def test_greedy_generation_matches_transformers(checkpoint):
    _name, hf_model, path = checkpoint
    ours = load_model(path)
    prompt = _prompt(GEN_PROMPT_TOKENS, ours.config.vocab_size, seed=1)
    expected = hf_greedy_generate(hf_model, prompt, NEW_TOKENS)
    assert len(expected) == NEW_TOKENS  # these test models have no eos token
    assert len(set(expected)) >= MIN_DISTINCT_GENERATED, "test model too degenerate to compare"
    assert greedy_generate(ours, prompt, NEW_TOKENS) == expected


def test_tied_checkpoint_has_no_lm_head_and_shares_the_embedding(tmp_path):
    save_tiny_checkpoint(Qwen2Config(**tiny_dims(tie_word_embeddings=True)), tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_demo_checkpoint_matches_transformers(tmp_path):
    path = ensure_demo_checkpoint(tmp_path / "demo")
    hf_model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ours = load_model(path)
    ids = _prompt(LOGITS_PROMPT_TOKENS, ours.config.vocab_size)
    with torch.inference_mode():
        theirs = hf_model(torch.tensor([ids])).logits[0]
    got = full_sequence_logits(ours, ids)
    torch.testing.assert_close(got, theirs, rtol=LOGITS_RTOL, atol=LOGITS_RTOL * theirs.abs().max().item())

    full_length = hf_greedy_generate(hf_model, ids[:GEN_PROMPT_TOKENS], NEW_TOKENS)
    assert len(full_length) == NEW_TOKENS
    assert greedy_generate(ours, ids[:GEN_PROMPT_TOKENS], NEW_TOKENS) == full_length

    ends_early = hf_greedy_generate(hf_model, DEMO_EOS_PROMPT, NEW_TOKENS)
    assert len(ends_early) < NEW_TOKENS and ends_early[-1] in ours.config.eos_token_ids
    assert greedy_generate(ours, DEMO_EOS_PROMPT, NEW_TOKENS) == ends_early
