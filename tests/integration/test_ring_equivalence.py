"""Greedy tokens through the real services over 1-4 gloo workers equal transformers' generate."""

import asyncio
import os

import pytest
import torch

from shared.attention.layout import placement_unit_tokens
from shared.settings import Settings
from tests.helpers.checkpoints import save_tiny_checkpoint, tiny_dims
from tests.integration.stack import Stack

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")

CHUNK = 7  # divides none of the prompt lengths below
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """Llama 3 shaped: GQA, llama3 rope scaling, random weights scaled so greedy output varies."""
    cfg = transformers.LlamaConfig(**tiny_dims(max_position_embeddings=512, eos_token_id=2),
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    path = tmp_path_factory.mktemp("tiny-llama")
    return path, save_tiny_checkpoint(cfg, path, seed=0)


def hf_greedy(model, ids):
    # eos disabled on the reference side; the comparison stops where ringserve stopped
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def ring_stack(tmp_path_factory, tiny_llama):
    path, _ = tiny_llama
    if os.environ.get("RINGSERVE_DEVICE") == "cuda" and torch.cuda.device_count() < 4:
        pytest.skip(f"NCCL takes one GPU per worker: 4 workers need 4 GPUs, {torch.cuda.device_count()} here")
    stack = Stack(tmp_path_factory.mktemp("ring"), workers=4,
                  env={"RINGSERVE_MODEL": str(path), "RINGSERVE_CHUNK_TOKENS": str(CHUNK)})
    try:
        asyncio.run(stack.wait_ready(4))
        yield stack
    finally:
        stack.stop()


@pytest.mark.parametrize("prompt_len,ring", [(6, 1), (13, 2), (20, 3), (45, 4)])
async def test_ring_of_n_workers_matches_transformers(ring_stack, tiny_llama, prompt_len, ring):
    _, model = tiny_llama
    ids = [(i * 37 + 11) % 297 + 3 for i in range(prompt_len)]
    reply = await ring_stack.generate({"input_ids": ids, "max_new_tokens": NEW_TOKENS})
    assert "error" not in reply, f"{reply}\n{ring_stack.logs()}"
    assert len(reply["placement"]["workers"]) == ring
    # the prompt is dealt in balanced zigzag units of at most CHUNK (CHUNK itself on one worker)
    unit = placement_unit_tokens(prompt_len, CHUNK, ring, Settings().kv_block_tokens)
    assert reply["placement"]["chunk_tokens"] == unit <= CHUNK
    assert reply["placement"]["chunks"] == -(-prompt_len // unit)
    expected = hf_greedy(model, ids)
    got = reply["output_ids"]
    assert got == expected[: len(got)] and (len(got) == NEW_TOKENS or got[-1] == 2)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
async def test_qwen2_and_mistral_over_a_two_worker_ring_match_transformers(tmp_path_factory, family):
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**tiny_dims(eos_token_id=2))  # q/k/v biases
    else:
        cfg = transformers.MistralConfig(**tiny_dims(num_key_value_heads=1, eos_token_id=2))  # MQA
    path = tmp_path_factory.mktemp(f"tiny-{family}")
    model = save_tiny_checkpoint(cfg, path, seed=3)
    stack = Stack(tmp_path_factory.mktemp(f"stack-{family}"), workers=2,
                  env={"RINGSERVE_MODEL": str(path), "RINGSERVE_CHUNK_TOKENS": str(CHUNK)})
    try:
        await stack.wait_ready(2)
        ids = [(i * 53 + 7) % 297 + 3 for i in range(23)]
        reply = await stack.generate({"input_ids": ids, "max_new_tokens": NEW_TOKENS})
        assert "error" not in reply, f"{reply}\n{stack.logs()}"
        assert len(reply["placement"]["workers"]) == 2
        got = reply["output_ids"]
        assert got == hf_greedy(model, ids)[: len(got)] and len(set(got)) > 1
    finally:
        stack.stop()


@pytest.mark.parametrize("family,workers", [("mistral", 1), ("mistral", 3), ("qwen2", 2)])
async def test_sliding_window_models_match_transformers_far_past_the_window(tmp_path_factory, family, workers):
    """Sliding-window attention, exact: a prompt many windows long, prefilled over rings of 1-3
    workers in chunks that do not divide it, then decoded (each token sees only the window)."""
    window = 5
    if family == "mistral":
        cfg = transformers.MistralConfig(**tiny_dims(sliding_window=window, eos_token_id=2))
    else:  # Qwen2 slides in the layers from max_window_layers on: here layer 1 slides, layer 0 does not
        cfg = transformers.Qwen2Config(**tiny_dims(sliding_window=window, use_sliding_window=True,
                                                   max_window_layers=1, eos_token_id=2))
    path = tmp_path_factory.mktemp(f"tiny-{family}-window")
    model = save_tiny_checkpoint(cfg, path, seed=4)
    stack = Stack(tmp_path_factory.mktemp(f"stack-{family}-window-{workers}"), workers=workers,
                  env={"RINGSERVE_MODEL": str(path), "RINGSERVE_CHUNK_TOKENS": str(CHUNK)})
    try:
        await stack.wait_ready(workers)
        ids = [(i * 31 + 11) % 297 + 3 for i in range(40)]  # 8 windows
        reply = await stack.generate({"input_ids": ids, "max_new_tokens": NEW_TOKENS})
        assert "error" not in reply, f"{reply}\n{stack.logs()}"
        assert len(reply["placement"]["workers"]) == workers
        got = reply["output_ids"]
        assert got == hf_greedy(model, ids)[: len(got)] and len(set(got)) > 1
    finally:
        stack.stop()
