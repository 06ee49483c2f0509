"""The worker's in-process LRU of blocks: bounded in bytes, most recently used kept."""

from __future__ import annotations

import torch

from shared.kv.hot_cache import HotCache
from shared.kv.quant import quantize_kv


def _block(tokens: int):
    return quantize_kv(torch.zeros(tokens, 1, 4), torch.zeros(tokens, 1, 4), "none", 4)


def test_bounded_in_bytes_and_evicts_least_recently_used():
    one = _block(8).nbytes
    cache = HotCache(max_bytes=3 * one)
    for key in "abc":
        cache.put(key, _block(8))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", _block(8))
    assert cache.get("b") is None
    assert all(cache.get(k) is not None for k in "acd")
    assert cache.nbytes == 3 * one and len(cache) == 3


def test_replacing_a_key_does_not_double_count():
    cache = HotCache(max_bytes=10_000)
    cache.put("a", _block(8))
    cache.put("a", _block(8))
    assert cache.nbytes == _block(8).nbytes


def test_too_large_or_disabled_stores_nothing():
    assert HotCache(max_bytes=0).get("a") is None
    cache = HotCache(max_bytes=_block(8).nbytes - 1)
    cache.put("a", _block(8))
    assert cache.get("a") is None and cache.nbytes == 0
