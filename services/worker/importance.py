"""H2O importance on the worker: the softmax mass each cached key received in a decode step,
added to its request's importance (what the KV store's eviction ranks blocks by)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shared.attention.paged import paged_key_attention_mass
from services.worker.kv_cache import KVPool, RequestKV
from services.worker.step import DecodeInputs, Recording


def add_importance(model, pool: KVPool, kvs: Sequence[RequestKV], record: Recording, x: DecodeInputs) -> None:
    """Add the mass of one observed step to each row's request (`kvs[b]` for row b).

    One layer per observed step of a request, its layers in turn: a sample of the mass summed
    over layers at 1/L of the cost of all of them. Every row in one batched pass (the pool's
    layers seen as one run of pages), one copy to the host."""
    device = x.seq_lens.device
    rows = torch.arange(len(kvs), device=device)
    layer_of = [kv.next_observed_layer(len(model.layers)) for kv in kvs]
    layers = torch.tensor(layer_of, dtype=torch.long).to(device)
    q = record.q[layers, rows]  # [B, H, d], each row's query at its layer
    lse = record.lse[layers, rows] if record.lse is not None else None
    pages_per_layer = pool.k_layers.shape[1]
    table = x.block_table.long() + layers[:, None] * pages_per_layer
    starts = None
    if x.window_starts is not None:  # each row from its window start at its layer
        slides = torch.tensor([model.config.window_of(i) is not None for i in layer_of]).to(device)
        other = x.full_layer_starts if x.full_layer_starts is not None else torch.zeros_like(x.window_starts)
        starts = torch.where(slides, x.window_starts, other)
    mass = paged_key_attention_mass(q, pool.k_layers.flatten(0, 1), table, x.seq_lens,
                                    model.attn_scale, lse, starts)  # [B, W * P]
    host = mass.cpu()
    for b, (kv, n) in enumerate(zip(kvs, x.seq_lens.tolist())):
        kv.add_mass(host[b, :n])
