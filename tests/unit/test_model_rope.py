"""Rope maths against transformers' own functions, and the properties rotary embeddings must have."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from shared.model.config import parse_rope_config
from shared.model.rope import apply_rope, rope_cos_sin, rope_inv_freq, rotate_half

HEAD_DIM = 16
MAX_POSITIONS = 64

ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "mscale": 0.7,
                    "mscale_all_dim": 1.0, "beta_fast": 16, "original_max_position_embeddings": 8},
    "yarn-no-truncate": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0, "truncate": False,
                         "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}


def _configs(name: str) -> tuple[LlamaConfig, dict]:
    params = dict(ROPE_PARAMETERS[name])
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=HEAD_DIM,
                     max_position_embeddings=MAX_POSITIONS, rope_parameters=dict(params))
    raw = {"max_position_embeddings": MAX_POSITIONS, "rope_parameters": params}
    return hf, raw


@pytest.mark.parametrize("name", sorted(ROPE_PARAMETERS))
@pytest.mark.parametrize("seq_len", [None, 10, MAX_POSITIONS, 3 * MAX_POSITIONS + 5])
def test_inv_freq_and_attention_factor_match_transformers(name, seq_len):
    hf_config, raw = _configs(name)
    rope_type = ROPE_PARAMETERS[name]["rope_type"]
    if rope_type == "default":
        expected_inv_freq, expected_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config)
    else:
        expected_inv_freq, expected_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_config, None, seq_len)
    inv_freq, factor = rope_inv_freq(parse_rope_config(raw), HEAD_DIM, MAX_POSITIONS, seq_len)
    torch.testing.assert_close(inv_freq, expected_inv_freq, rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


def test_dynamic_ntk_stretches_only_beyond_max_positions():
    _, raw = _configs("dynamic")
    rope = parse_rope_config(raw)
    default, _ = rope_inv_freq(parse_rope_config(_configs("default")[1]), HEAD_DIM, MAX_POSITIONS)
    within, _ = rope_inv_freq(rope, HEAD_DIM, MAX_POSITIONS, MAX_POSITIONS)
    beyond, _ = rope_inv_freq(rope, HEAD_DIM, MAX_POSITIONS, 2 * MAX_POSITIONS)
    torch.testing.assert_close(within, default)
    assert beyond[0] == default[0]  # the fastest frequency keeps its period
    assert (beyond[1:] < default[1:]).all()


@pytest.mark.parametrize("name", ["default", "yarn", "llama3"])
def test_cos_sin_and_rotation_match_transformers(name):
    hf_config, raw = _configs(name)
    rotary = LlamaRotaryEmbedding(hf_config)
    positions = torch.tensor([0, 1, 5, 17, 40, 1000])
    x = torch.randn(1, positions.numel(), HEAD_DIM)
    hf_cos, hf_sin = rotary(x, positions[None])

    inv_freq, factor = rope_inv_freq(parse_rope_config(raw), HEAD_DIM, MAX_POSITIONS)
    cos, sin = rope_cos_sin(positions, inv_freq, factor)
    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=0)
    torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=0)

    q = torch.randn(positions.numel(), 4, HEAD_DIM)  # [t, heads, d]
    k = torch.randn(positions.numel(), 2, HEAD_DIM)
    # transformers' layout is [batch, heads, t, d]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), hf_q[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(apply_rope(k, cos, sin), hf_k[0].transpose(0, 1), rtol=0, atol=0)


def test_rotate_half_pairs_dimension_i_with_i_plus_half():
    x = torch.arange(1.0, 7.0)  # [1 2 3 | 4 5 6]
    assert rotate_half(x).tolist() == [-4.0, -5.0, -6.0, 1.0, 2.0, 3.0]


def test_rope_keeps_norms_and_makes_scores_depend_on_relative_position():
    inv_freq, factor = rope_inv_freq(parse_rope_config({"max_position_embeddings": 8}), HEAD_DIM, 8)
    q = torch.randn(1, 1, HEAD_DIM, dtype=torch.float64)
    k = torch.randn(1, 1, HEAD_DIM, dtype=torch.float64)

    def score(q_pos: int, k_pos: int) -> float:
        cq, sq = rope_cos_sin(torch.tensor([q_pos]), inv_freq, factor)
        ck, sk = rope_cos_sin(torch.tensor([k_pos]), inv_freq, factor)
        rq, rk = apply_rope(q, cq.double(), sq.double()), apply_rope(k, ck.double(), sk.double())
        assert rq.norm().item() == pytest.approx(q.norm().item(), rel=1e-6)
        return float((rq * rk).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    assert not math.isclose(score(7, 3), score(7, 4), rel_tol=1e-3)


def test_yarn_factor_scales_cos_and_sin():
    _, raw = _configs("yarn")
    inv_freq, factor = rope_inv_freq(parse_rope_config(raw), HEAD_DIM, MAX_POSITIONS)
    assert factor == pytest.approx(0.1 * math.log(4.0) + 1.0)
    cos, sin = rope_cos_sin(torch.tensor([0, 3]), inv_freq, factor)
    torch.testing.assert_close(cos[0], torch.full((HEAD_DIM,), factor))
    torch.testing.assert_close(cos.pow(2) + sin.pow(2), torch.full((2, HEAD_DIM), factor**2))
