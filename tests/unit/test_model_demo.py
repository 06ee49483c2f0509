"""The demo checkpoint: a real, deterministic Hugging Face directory, safe to materialise concurrently."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from shared.model import ensure_demo_checkpoint, load_model, load_tokenizer
from shared.model.demo import DEMO_CONFIG, DEMO_FORMAT_VERSION
from tests.helpers.checkpoints import full_sequence_logits, greedy_generate

CONCURRENT_CALLERS = 4
NEW_TOKENS = 32
# Greedy text of a degenerate random model repeats one or two tokens; this one must do better.
MIN_DISTINCT_GENERATED = 8
MIN_LOGIT_STD = 1.0


def _files(path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def test_same_bytes_every_time(tmp_path):
    a = ensure_demo_checkpoint(tmp_path / "a")
    b = ensure_demo_checkpoint(tmp_path / "b")
    assert set(_files(a)) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert _files(a) == _files(b)


def test_idempotent_and_leaves_no_staging_behind(tmp_path):
    path = ensure_demo_checkpoint(tmp_path / "demo")
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_checkpoint(tmp_path / "demo") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_concurrent_callers_all_get_the_complete_checkpoint(tmp_path):
    barrier = threading.Barrier(CONCURRENT_CALLERS)
    results, errors = [], []

    def call():
        barrier.wait()
        try:
            results.append(ensure_demo_checkpoint(tmp_path / "demo"))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(CONCURRENT_CALLERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == CONCURRENT_CALLERS
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    assert _files(tmp_path / "demo") == _files(ensure_demo_checkpoint(tmp_path / "reference"))


def test_stale_demo_version_is_replaced_but_other_directories_are_not_touched(tmp_path):
    stale = tmp_path / "demo"
    stale.mkdir()
    (stale / "config.json").write_text(json.dumps({"ringserve_demo_version": DEMO_FORMAT_VERSION - 1}))
    ensure_demo_checkpoint(stale)
    assert json.loads((stale / "config.json").read_text())["ringserve_demo_version"] == DEMO_FORMAT_VERSION

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ensure_demo_checkpoint(other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_demo_is_the_specified_shape_and_not_degenerate(tmp_path):
    path = ensure_demo_checkpoint(tmp_path / "demo")
    model, tokenizer = load_model(path), load_tokenizer(path)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 4, 8)
    assert (config.num_key_value_heads, config.head_dim, config.intermediate_size) == (2, 16, 352)
    assert config.rope.rope_theta == 500_000.0 and config.max_position_embeddings == 1_048_576
    assert config.vocab_size == tokenizer.vocab_size == DEMO_CONFIG["vocab_size"]
    assert tokenizer.eos_token_ids == config.eos_token_ids

    prompt = tokenizer.encode("Ring attention splits a long sequence across workers.")
    logits = full_sequence_logits(model, prompt)
    assert logits.std(dim=-1).min() > MIN_LOGIT_STD
    generated = greedy_generate(model, prompt, NEW_TOKENS)
    assert len(set(generated)) >= MIN_DISTINCT_GENERATED
    assert torch.isfinite(logits).all()
