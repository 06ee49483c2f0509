"""Greedy tokens through the real services over 1-4 gloo workers equal transformers' generate."""

import asyncio
import json

import nats
import pytest
import torch

from tests.integration.stack import Stack

pytestmark = pytest.mark.integration
transformers = pytest.importorskip("transformers")

CHUNK = 7  # divides none of the prompt lengths below
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   rope_theta=10000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def hf_greedy(model, ids):
    # eos disabled on the reference side; the comparison stops where ringserve stopped
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def ring_stack(servers, tmp_path_factory, tiny_llama):
    path, _ = tiny_llama
    stack = Stack(servers, tmp_path_factory.mktemp("ring"), workers=4,
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
    nc = await nats.connect(ring_stack.servers.nats_url)
    try:
        msg = await nc.request("ringserve.v1.generate",
                               json.dumps({"input_ids": ids, "max_new_tokens": NEW_TOKENS}).encode(), timeout=120)
        reply = json.loads(msg.data)
    finally:
        await nc.close()
    assert "error" not in reply, f"{reply}\n{ring_stack.logs()}"
    assert len(reply["placement"]["workers"]) == ring
    assert reply["placement"]["chunk_tokens"] == CHUNK
    expected = hf_greedy(model, ids)
    got = reply["output_ids"]
    assert got == expected[: len(got)] and (len(got) == NEW_TOKENS or got[-1] == 2)
