"""A WorkerEngine over a small growable KV pool, for tests that drive the engine directly."""

from __future__ import annotations

import torch

from services.worker.engine import WorkerEngine
from services.worker.kv_cache import KVPool

# Small pages, so that a test's few tokens span several of them (and a partly filled last one).
TEST_PAGE_TOKENS = 4
TEST_POOL_PAGES = 8  # grows on demand


def make_engine(model, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                page_tokens: int = TEST_PAGE_TOKENS, **kwargs) -> WorkerEngine:
    device = torch.device(device)
    pool = KVPool.for_model(model.config, page_tokens, TEST_POOL_PAGES, dtype, device, growable=True)
    return WorkerEngine(model, device, dtype, pool, **kwargs)
