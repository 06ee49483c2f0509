"""config.json parsing: the fields, Hugging Face's defaults and precedence, and what is refused."""

from __future__ import annotations

import json

import pytest

from shared.model.config import UnsupportedModel, parse_model_config
from shared.model.loader import load_config


def _raw(**overrides) -> dict:
    raw = {
        "model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 256,
    }
    return {**raw, **overrides}


def test_defaults_follow_transformers():
    config = parse_model_config(_raw())
    assert config.num_key_value_heads == 4 and config.kv_groups == 1
    assert config.head_dim == 16
    assert config.rope.rope_type == "default" and config.rope.rope_theta == 10000.0
    assert config.rms_norm_eps == 1e-6
    assert not (config.qkv_bias or config.o_proj_bias or config.mlp_bias or config.tie_word_embeddings)
    assert config.eos_token_ids == () and config.sliding_window is None


def test_explicit_fields():
    config = parse_model_config(_raw(
        num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, bos_token_id=1, eos_token_id=[2, 7],
    ))
    assert (config.num_key_value_heads, config.kv_groups, config.head_dim) == (1, 4, 32)
    assert config.rms_norm_eps == 1e-5 and config.tie_word_embeddings
    assert config.qkv_bias and config.o_proj_bias and config.mlp_bias  # llama's flag covers q, k, v and o
    assert config.bos_token_id == 1 and config.eos_token_ids == (2, 7)


def test_qwen2_has_qkv_bias_but_no_o_proj_bias():
    config = parse_model_config(_raw(model_type="qwen2", attention_bias=False))
    assert config.qkv_bias and not config.o_proj_bias


def test_rope_parameters_of_transformers_5():
    rope = parse_model_config(_raw(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    })).rope
    assert (rope.rope_type, rope.rope_theta, rope.factor) == ("llama3", 500000.0, 8.0)
    assert (rope.low_freq_factor, rope.high_freq_factor, rope.original_max_position_embeddings) == (1.0, 4.0, 8192)


def test_legacy_rope_scaling_with_top_level_theta():
    rope = parse_model_config(_raw(rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0})).rope
    assert (rope.rope_type, rope.rope_theta, rope.factor) == ("linear", 1e6, 2.0)


def test_yarn_defaults():
    rope = parse_model_config(_raw(rope_scaling={"rope_type": "yarn", "factor": 4.0})).rope
    # without an explicit original length transformers uses max_position_embeddings
    assert rope.original_max_position_embeddings == 256
    assert (rope.beta_fast, rope.beta_slow, rope.truncate, rope.attention_factor) == (32.0, 1.0, True, None)


def test_sliding_window_rules():
    assert parse_model_config(_raw(model_type="mistral", sliding_window=4096)).sliding_window == 4096
    assert parse_model_config(_raw(model_type="mistral", sliding_window=None)).sliding_window is None
    # Qwen2 ships a window that is off unless use_sliding_window is set
    assert parse_model_config(_raw(model_type="qwen2", sliding_window=32768)).sliding_window is None
    on = _raw(model_type="qwen2", sliding_window=128, use_sliding_window=True)
    assert parse_model_config({**on, "layer_types": ["full_attention"] * 2}).sliding_window is None
    assert parse_model_config({**on, "layer_types": ["full_attention", "sliding_attention"]}).sliding_window == 128
    assert parse_model_config({**on, "max_window_layers": 1}).sliding_window == 128
    assert parse_model_config(on).sliding_window is None  # 2 layers, all below max_window_layers=28


def test_sliding_layers_follow_each_model_type():
    mistral = parse_model_config(_raw(model_type="mistral", sliding_window=16))
    assert mistral.sliding_layers == (0, 1) and mistral.window_of(1) == 16
    qwen2 = parse_model_config(_raw(model_type="qwen2", sliding_window=8, use_sliding_window=True, max_window_layers=1))
    assert qwen2.sliding_layers == (1,) and qwen2.window_of(0) is None and qwen2.window_of(1) == 8
    typed = parse_model_config(_raw(model_type="mistral", sliding_window=8,
                                    layer_types=["sliding_attention", "full_attention"]))
    assert typed.sliding_layers == (0,) and typed.window_of(1) is None


def test_llama_shaped_architecture_with_another_model_type_is_accepted():
    assert parse_model_config(_raw(model_type="my-finetune", architectures=["LlamaForCausalLM"])).head_dim == 16


@pytest.mark.parametrize("overrides, message", [
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "not Llama-shaped"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}, "longrope"),
    ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantized"),
    ({"num_key_value_heads": 3}, "multiple"),
])
def test_unsupported_models_are_refused_clearly(overrides, message):
    with pytest.raises(UnsupportedModel, match=message):
        parse_model_config(_raw(**overrides))


def test_load_config_adds_generation_config_eos_ids(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_raw(eos_token_id=5)))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9, 11]}))
    assert load_config(tmp_path).eos_token_ids == (5, 9, 11)
