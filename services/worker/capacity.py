"""How many KV tokens a worker can hold: what the scheduler places against, so a long prompt
gets more ring members (or waits) instead of overfilling one device.

Capacity and the heartbeat's `kv_tokens` count rows held in the pool: a request that gives back
its pages behind its window (shared/attention/kv_need.py) counts only the rows it still holds,
and admission places it on one worker against its bound (sinks + window + a prefill chunk), so
a prompt far longer than the capacity runs there."""

from __future__ import annotations

import torch

from shared.messages import ModelInfo
from shared.settings import Settings

MEMINFO = "/proc/meminfo"


def kv_bytes_per_token(model: ModelInfo) -> int:
    """K and V of every layer for one token: 2 x layers x KV heads x head_dim x element size."""
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * getattr(torch, model.dtype).itemsize


def kv_capacity_tokens(settings: Settings, model: ModelInfo, free_device_bytes: int | None) -> int | None:
    """settings.worker_max_tokens when set; else the share kv_memory_fraction of the device
    memory left after loading the model (the rest is for activations: a member's q/k/v and the
    K/V blocks in flight around the ring); None (no limit) where that is not known."""
    if settings.worker_max_tokens:
        return settings.worker_max_tokens
    if free_device_bytes is None:
        return None
    return int(free_device_bytes * settings.kv_memory_fraction) // kv_bytes_per_token(model)


def free_device_bytes(device: torch.device) -> int | None:
    """Memory free for KV on the device: the GPU's free memory, or on the CPU the host's available
    memory (Linux MemAvailable); None where that is not known."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def kv_pool_pages(settings: Settings, capacity_tokens: int | None) -> int | None:
    """The most pages of the worker's KV pool: the capacity in pages, plus a partly filled page
    for each request a decode step can hold; None: no limit known."""
    if capacity_tokens is None:
        return None
    return -(-capacity_tokens // settings.kv_block_tokens) + settings.decode_max_batch
