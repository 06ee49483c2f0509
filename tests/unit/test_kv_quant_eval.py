"""KV quantization on the demo model's real activations: the error targets of the KV store issue."""

from __future__ import annotations

import pytest
import torch

from bench.quant_eval import evaluate_quantization, roundtrip_blocks
from shared.model import ensure_demo_checkpoint, load_model, load_tokenizer

BLOCK_TOKENS, GROUP, NEW_TOKENS = 32, 32, 12
PROMPT = "The KV cache of a long prompt outgrows the weights; blocks of it are kept in Redis. " * 2
# The target for int8: attention-output error below 0.5% (measured ~0.1% on this model).
INT8_MAX_ATTENTION_ERROR = 0.005
# int4 is coarser: measured ~2-3%.
INT4_MAX_ATTENTION_ERROR = 0.05


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = ensure_demo_checkpoint(tmp_path_factory.mktemp("kv-demo") / "demo")
    # Many tiny ops: one thread is an order of magnitude faster than two on a busy 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model(path), load_tokenizer(path)
    torch.set_num_threads(threads)


def test_errors_on_demo_activations(demo):
    model, tokenizer = demo
    ids = tokenizer.encode(PROMPT)
    ids = ids[: (len(ids) // BLOCK_TOKENS) * BLOCK_TOKENS - 1]  # full blocks but the last, plus a tail
    reports = evaluate_quantization(model, ids, ["none", "int8", "int4"], BLOCK_TOKENS, GROUP, NEW_TOKENS)
    reports = {r.mode: r for r in reports}
    assert reports["none"].attention_rel_error == 0.0
    assert reports["none"].greedy_tokens_equal == NEW_TOKENS
    assert 0.0 < reports["int8"].attention_rel_error < INT8_MAX_ATTENTION_ERROR
    assert reports["int8"].greedy_tokens_equal == NEW_TOKENS
    assert reports["int8"].attention_rel_error < reports["int4"].attention_rel_error < INT4_MAX_ATTENTION_ERROR
    assert reports["int8"].bytes_per_token < 0.6 * reports["none"].bytes_per_token
    assert reports["int4"].bytes_per_token < 0.35 * reports["none"].bytes_per_token


def test_only_full_blocks_are_quantized():
    k, v = torch.randn(70, 2, 16), torch.randn(70, 2, 16)
    k2, v2 = roundtrip_blocks(k, v, "int4", 32, 16)
    assert torch.equal(k2[64:], k[64:]) and torch.equal(v2[64:], v[64:])
    assert not torch.equal(k2[:64], k[:64])
