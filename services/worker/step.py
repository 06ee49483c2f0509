"""One decode step of a batch through the model, over the paged KV pool: the recipe that both the
eager path and the captured CUDA graphs run (gpt-fast's `decode_one_token`, batched and paged).

Per layer: q/k/v of every row, each row's new K/V written to its slot (rows that append nothing
write the scratch page), one paged attention call for the whole batch (from each row's window
start; the sink and strided rows of hybrid/strided requests in a second, gathered call merged
into it: eager steps only, the graphs take no such rows), then the rows' partials
merged with their ring peers' (`merge`, only for requests spread over several workers), and the
rest of the layer. No host synchronisation anywhere: every input is a device tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from shared.attention.merge import merge_partials
from shared.attention.paged import paged_decode_attention, paged_rows_attention
from services.worker.kv_cache import KVPool

# merge(layer, out [B, H, d], lse [B, H]) -> the global (out, lse) of every row
MergeFn = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass
class Recording:
    """What an observed step keeps of every layer for the H2O importance pass, run after it."""

    q: Tensor  # [L, B, H, d] each layer's queries
    lse: Tensor | None = None  # [L, B, H] the merged (global) lse of a ring's rows; None: local rows


@dataclass
class DecodeInputs:
    """A batch of B rows, all on the device."""

    ids: Tensor  # [B] int64, the token fed back
    positions: Tensor  # [B] int64
    write_page: Tensor  # [B] int64, where the row's new K/V goes (the scratch page: nowhere)
    write_slot: Tensor  # [B] int64
    block_table: Tensor  # [B, W] int32, each row's pages in row order
    seq_lens: Tensor  # [B] int32, rows each one attends over (after this step's append)
    window_starts: Tensor | None = None  # [B] int32, first row inside the window (the model's sliding layers)
    # [B] int32, first row attended in the model's other layers: a request pattern's window start
    # (its pattern applies in every layer), 0 for full attention; None: 0 for every row
    full_layer_starts: Tensor | None = None
    # The sink and strided rows of hybrid/strided requests, outside their windows (every layer):
    extra_rows: Tensor | None = None  # [B, E] int64 rows of each sequence, padded; None: no row has any
    extra_valid: Tensor | None = None  # [B, E] bool, which of extra_rows count


def decode_forward(model, pool: KVPool, x: DecodeInputs, cos: Tensor, sin: Tensor,
                   merge: MergeFn | None = None, record: Recording | None = None) -> Tensor:
    """-> h [B, hidden] after the last layer (before the final norm); with `record`, each layer's
    queries (and merged lse) are copied into it."""
    h = model.embed(x.ids)  # [B, hidden]
    for i, layer in enumerate(model.layers):
        q, k, v = layer.qkv(h, cos, sin)  # q [B, H, d], k/v [B, KVH, d]
        pool.k[i][x.write_page, :, x.write_slot] = k
        pool.v[i][x.write_page, :, x.write_slot] = v
        starts = x.window_starts if model.config.window_of(i) is not None else x.full_layer_starts
        extra = x.extra_rows is not None
        out, lse = paged_decode_attention(q, pool.k[i], pool.v[i], x.block_table, x.seq_lens, model.attn_scale,
                                          need_lse=merge is not None or extra, seq_starts=starts)
        if extra:  # the sinks / strided keys before the window: a disjoint key set, merged exactly
            extra_out, extra_lse = paged_rows_attention(q, pool.k[i], pool.v[i], x.block_table, x.extra_rows,
                                                        x.extra_valid, model.attn_scale)
            out, lse = merge_partials([out, extra_out], [lse, extra_lse])
        if merge is not None:
            out, lse = merge(i, out, lse)
        if record is not None:
            record.q[i].copy_(q)
            if record.lse is not None:
                record.lse[i].copy_(lse)
        h = layer.finish(h, out.to(h.dtype))
    return h


def rope_for(model, positions: Tensor, seq_lens: list[int]) -> tuple[Tensor, Tensor]:
    """cos, sin [B, d] of the rows: one call for static rope types; per row where the frequencies
    depend on each sequence's own length (dynamic NTK)."""
    if model.rope_is_static:
        return model.rope_static(positions)
    parts = [model.rope(positions[b : b + 1], seq_len=n) for b, n in enumerate(seq_lens)]
    return torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])
