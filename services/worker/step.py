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
from services.worker.kv_cache import SCRATCH_PAGE, KVPool

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


def decode_inputs(token_ids: list[int], positions: list[int], pages: list[list[int]], slots: list[tuple[int, int]],
                  seq_lens: list[int], window_starts: list[int] | None, full_layer_starts: list[int] | None,
                  device: torch.device) -> DecodeInputs:
    """The batch's rows as device tensors; each row's block table padded with the scratch page."""
    width = max(len(p) for p in pages)
    table = torch.full((len(pages), width), SCRATCH_PAGE, dtype=torch.int32)
    for b, p in enumerate(pages):
        table[b, : len(p)] = torch.tensor(p, dtype=torch.int32)

    def on_device(values: list[int] | None, dtype: torch.dtype) -> Tensor | None:
        return None if values is None else torch.tensor(values, dtype=dtype, device=device)

    return DecodeInputs(
        ids=on_device(token_ids, torch.long),
        positions=on_device(positions, torch.long),
        write_page=on_device([p for p, _ in slots], torch.long),
        write_slot=on_device([s for _, s in slots], torch.long),
        block_table=table.to(device),
        seq_lens=on_device(seq_lens, torch.int32),
        window_starts=on_device(window_starts, torch.int32),
        full_layer_starts=on_device(full_layer_starts, torch.int32),
    )


def padded_rows(per_row: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Rows of different counts per batch row -> (rows [B, E] int64 padded with row 0, valid [B, E] bool)."""
    width = max(1, max(len(rows) for rows in per_row))
    rows = torch.zeros(len(per_row), width, dtype=torch.long)
    valid = torch.zeros(len(per_row), width, dtype=torch.bool)
    for b, found in enumerate(per_row):
        rows[b, : len(found)] = torch.tensor(found, dtype=torch.long)
        valid[b, : len(found)] = True
    return rows.to(device), valid.to(device)


def recording_for(model, batch: int, dtype: torch.dtype, device: torch.device, merged: bool) -> Recording:
    """Buffers for an eager observed step: every layer's queries, and for a ring's rows the
    merged lse (a member holds only its shard of the keys, so it cannot compute it)."""
    layers, heads, dim = len(model.layers), model.config.num_attention_heads, model.config.head_dim
    q = torch.empty(layers, batch, heads, dim, dtype=dtype, device=device)
    lse = torch.empty(layers, batch, heads, dtype=torch.float32, device=device) if merged else None
    return Recording(q=q, lse=lse)


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
