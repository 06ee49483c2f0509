"""A WorkerEngine over a small growable KV pool, for tests that drive the engine directly."""

from __future__ import annotations

import torch

from services.worker.engine import WorkerEngine
from services.worker.kv_cache import KVPool
from shared.model import LlamaModel, parse_model_config

# Small pages, so that a test's few tokens span several of them (and a partly filled last one).
TEST_PAGE_TOKENS = 4
TEST_POOL_PAGES = 8  # grows on demand


def make_engine(model, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                page_tokens: int = TEST_PAGE_TOKENS, **kwargs) -> WorkerEngine:
    device = torch.device(device)
    pool = KVPool.for_model(model.config, page_tokens, TEST_POOL_PAGES, dtype, device, growable=True)
    return WorkerEngine(model, device, dtype, pool, **kwargs)


def tiny_llama(layers: int = 2, vocab: int = 97, max_positions: int = 256, **config) -> LlamaModel:
    """A tiny random Llama in float32 (hidden 32, 4/2 heads), its lm_head scaled up: logits large
    enough that a wrong row changes the greedy token. `config`: more raw config.json fields."""
    raw = {"model_type": "llama", "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": max_positions, **config}
    torch.manual_seed(0)
    model = LlamaModel(parse_model_config(raw)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model

