"""Loading checkpoint directories: single-file and sharded safetensors, dtypes, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from shared.model import CheckpointError, UnsupportedModel, load_model
from tests.helpers.checkpoints import full_sequence_logits, save_tiny_checkpoint, tiny_dims

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79]


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    save_tiny_checkpoint(LlamaConfig(**tiny_dims()), path)
    return path


def _rewrite_weights(path, edit) -> None:
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_loaded_model_is_ready_for_inference(checkpoint):
    model = load_model(checkpoint)
    params = list(model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 and not p.requires_grad for p in params)
    assert not model.training
    assert model.attn_scale == pytest.approx(16**-0.5)


def test_sharded_checkpoint_loads_the_same_weights(tmp_path):
    model_config = LlamaConfig(**tiny_dims())
    hf_model = save_tiny_checkpoint(model_config, tmp_path / "single")
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1

    single, sharded = load_model(tmp_path / "single"), load_model(tmp_path / "sharded")
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), name


def test_bfloat16_weights_give_close_float32_logits(checkpoint):
    full = load_model(checkpoint)
    half = load_model(checkpoint, dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    expected, got = full_sequence_logits(full, PROMPT), full_sequence_logits(half, PROMPT)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_legacy_rotary_buffers_in_the_checkpoint_are_ignored(checkpoint):
    def add_inv_freq(state):
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)

    expected = full_sequence_logits(load_model(checkpoint), PROMPT)
    _rewrite_weights(checkpoint, add_inv_freq)
    torch.testing.assert_close(full_sequence_logits(load_model(checkpoint), PROMPT), expected)


def test_missing_directory_config_or_weights(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "empty")
    (checkpoint / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(checkpoint)


def test_missing_shard_named_in_the_index(tmp_path):
    sharded = tmp_path / "sharded"
    hf_model = save_tiny_checkpoint(LlamaConfig(**tiny_dims()), tmp_path / "single")
    hf_model.save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    (sharded / next(iter(index["weight_map"].values()))).unlink()
    with pytest.raises(CheckpointError, match="shards"):
        load_model(sharded)


def test_missing_weight(checkpoint):
    _rewrite_weights(checkpoint, lambda state: state.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(checkpoint)


def test_weight_of_the_wrong_shape(checkpoint):
    def shrink(state):
        state["model.norm.weight"] = state["model.norm.weight"][:10].clone()

    _rewrite_weights(checkpoint, shrink)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_model(checkpoint)


def test_weights_of_an_unknown_architecture_are_refused(checkpoint):
    # e.g. Qwen3's per-head q/k norms: silently ignoring them would give wrong outputs
    def add_q_norm(state):
        state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)

    _rewrite_weights(checkpoint, add_q_norm)
    with pytest.raises(UnsupportedModel, match="q_norm"):
        load_model(checkpoint)
