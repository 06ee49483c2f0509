"""A worker's model and KV pool: the checkpoint loaded onto the device, the paged KV pool sized
from the KV capacity, the decode step's CUDA graphs, and the resident prefix tier."""

from __future__ import annotations

import torch

from shared.checkpoint import model_id, resolve_checkpoint
from shared.messages import ModelInfo
from shared.settings import Settings
from services.worker.capacity import free_device_bytes, kv_capacity_tokens, kv_pool_pages
from services.worker.engine import WorkerEngine
from services.worker.kv_cache import KVPool
from services.worker.resident_prefix import ResidentPrefix


def load_engine(settings: Settings) -> tuple[WorkerEngine, ModelInfo, int | None]:
    """The model, its KV pool (sized from the KV capacity) and, on CUDA, the decode step's
    graphs; with the model's info and the KV tokens this worker can hold (None: no limit)."""
    from shared.model.loader import load_model

    device = torch.device(settings.device)
    dtype = getattr(torch, settings.torch_dtype_name)
    model = load_model(resolve_checkpoint(settings), device=device, dtype=dtype)
    cfg = model.config
    info = ModelInfo(
        name=model_id(settings),
        vocab_size=cfg.vocab_size,
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        eos_token_ids=list(cfg.eos_token_ids),
        dtype=settings.torch_dtype_name,
        sliding_window=cfg.sliding_window,
        sliding_layers=list(cfg.sliding_layers),
    )
    capacity = kv_capacity_tokens(settings, info, free_device_bytes(device))
    most = kv_pool_pages(settings, capacity)
    if device.type == "cuda":  # all of it now: the decode graphs hold the pool's addresses
        pool = KVPool.for_model(cfg, settings.kv_block_tokens, most, dtype, device,
                                copy_chunk_bytes=settings.kv_io_copy_chunk_bytes)
    else:  # host memory is taken as the pool grows, up to the capacity
        start = -(-settings.kv_pool_initial_tokens // settings.kv_block_tokens)
        pool = KVPool.for_model(cfg, settings.kv_block_tokens, min(start, most or start), dtype, device,
                                growable=True, max_pages=most)
    graphs = None
    if device.type == "cuda" and settings.decode_cuda_graphs and model.rope_is_static:
        from services.worker.graphs import DecodeGraphs

        graphs = DecodeGraphs(model, pool, settings)
    engine = WorkerEngine(model, device, dtype, pool, dist_timeout_s=settings.dist_timeout_s, graphs=graphs,
                          finish_chunk_tokens=settings.prefill_mlp_chunk_tokens)
    if settings.kv_store_enabled and settings.kv_resident_prefix:
        engine.resident = ResidentPrefix(pool, max_pages=pool.pages, host_bytes=settings.kv_host_cache_bytes)
    return engine, info, capacity

