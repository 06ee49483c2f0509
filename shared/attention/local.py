"""Attention of one block of queries over one block of keys, as a partial for merge_partials.

Shapes (flat tokens, no batch):
  q: [tq, H, d]        k, v: [tk, KVH, d]   with H a multiple of KVH (GQA; KVH == 1 is MQA)
  out: [tq, H, d]      float32, softmax-weighted values normalised over this block's keys
  lse: [tq, H]         float32, natural-log sum-exp of the scaled scores (-inf: no key seen)
Query head h reads KV head h // (H // KVH), as in Llama-style checkpoints.

Masking is by global positions: query i sits at q_start + i, key j at k_start + j, and with
`causal` a query sees the keys at positions <= its own; with a `pattern` (shared/attention/pattern.py)
also only the keys the pattern keeps: a window W (the keys after its own position - W, as
transformers masks a sliding window), plus sinks or strided keys. A block the pattern empties is
skipped, one it keeps whole (every causal pair seen) takes the fast paths below unchanged, and one
it cuts is masked per (query, key) on the plain path. A cut block of more than one row tile
(tile_rows: the window, at least MIN_TILE_ROWS) is computed tile by tile: each tile of queries
reads only the keys its window reaches (a contiguous slice, masked) and, as a second partial
merged exactly, the sink or strided keys before that slice (all seen by every query of the tile,
so unmasked and on the fused kernels on CUDA). The work then scales with tq x (tile + W) + the
extra keys instead of tq x tk. So the diagonal block of a causal
sequence (q_start == k_start), a block entirely in the past (full) and one entirely in the
future (nothing seen) are all one call.

Two paths:
  * plain torch in float32: CPU, float32/float64 inputs, and shapes the fused kernels refuse.
    K/V are never repeated per query head: q is viewed as [KVH, group * tq, d] against
    k: [KVH, tk, d]. Queries are processed in chunks so the score matrix stays bounded.
  * CUDA bf16/fp16: PyTorch's fused cuDNN attention (flash as the fallback), which return
    natural-log LSE. Both take unexpanded GQA/MQA K/V (checked on an H100 with torch 2.11;
    the memory-efficient kernel does not, so it is not used). Their `is_causal` masks are
    aligned differently when tq != tk (cuDNN top-left, flash bottom-right), so is_causal is
    only used on a square diagonal block; keys before the queries go in a second, unmasked
    call, keys after them are dropped, and the two partials are merged.
"""

from __future__ import annotations

import torch

from shared.attention.merge import merge_partials
from shared.attention.pattern import BlockCover, KeyPattern, tile_keys

FUSED_DTYPES = (torch.bfloat16, torch.float16)
# The plain path materialises float32 scores [H, query rows, tk]; this many elements at most.
PLAIN_SCORE_ELEMENTS = 1 << 24
# A tile of a cut block reads tile + W - 1 window keys per query: tiles of W rows keep that within
# 2 W. Below this many rows each tile's kernel calls and masks cost more than the keys they skip.
MIN_TILE_ROWS = 128


def tile_rows(pattern: KeyPattern) -> int:
    """Query rows per tile of a block a windowed pattern cuts."""
    return max(pattern.window, MIN_TILE_ROWS)


def empty_partial(tq: int, heads: int, dim: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial of queries that saw no key: out 0, lse -inf."""
    out = torch.zeros(tq, heads, dim, dtype=torch.float32, device=device)
    lse = torch.full((tq, heads), float("-inf"), dtype=torch.float32, device=device)
    return out, lse


def split_keys_by_position(tq: int, tk: int, q_start: int, k_start: int) -> tuple[int, int]:
    """Causal split of a key block against a query block: (n_before, n_upto).

    keys[:n_before] sit before the first query (every query sees them),
    keys[n_before:n_upto] sit at the queries' positions (the diagonal, partly seen),
    keys[n_upto:] sit after the last query (no query sees them).
    """
    n_before = min(max(q_start - k_start, 0), tk)
    n_upto = min(max(q_start + tq - k_start, 0), tk)
    return n_before, n_upto


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    causal: bool = False,
    q_start: int = 0,
    k_start: int = 0,
    pattern: KeyPattern | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [tq, H, d] over k, v [tk, KVH, d] -> (out [tq, H, d], lse [tq, H]), float32."""
    _check_shapes(q, k, v)
    # Tiles are causal (a pattern's keys are): without `causal`, only blocks of keys all in the past.
    if pattern is not None and not pattern.is_full and (causal or k_start + k.shape[0] <= q_start + 1) \
            and _worth_tiling(q.shape[0], pattern) \
            and _block_cover(q, k, q_start, k_start, pattern) is BlockCover.CUT:
        return attention_tiled(q, k, v, scale, q_start=q_start, k_start=k_start, pattern=pattern)
    return _attention_block(q, k, v, scale, causal, q_start, k_start, pattern)


def attention_tiled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, q_start: int, k_start: int,
    pattern: KeyPattern,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q [tq, H, d] over k, v [tk, KVH, d] under a windowed pattern, tile by
    tile of tile_rows(pattern) query rows -> (out [tq, H, d], lse [tq, H]) float32, exactly the
    block's masked attention: each tile's keys are split into disjoint sets (its window span and
    the sink / strided keys before it, tile_keys) whose partials merge_partials joins."""
    _check_shapes(q, k, v)
    tq, heads, dim = q.shape
    tk = k.shape[0]
    out, lse = empty_partial(tq, heads, dim, q.device)
    rows = tile_rows(pattern)
    for lo in range(0, tq, rows):
        hi = min(lo + rows, tq)
        (span_lo, span_hi), extra = tile_keys(pattern, q_start + lo, q_start + hi, k_start, k_start + tk)
        outs, lses = [], []
        if span_hi > span_lo:  # the window's keys: sliced views, masked per (query, key)
            span = slice(span_lo - k_start, span_hi - k_start)
            o, l = _attention_block(q[lo:hi], k[span], v[span], scale, True, q_start + lo, span_lo, pattern)
            outs.append(o)
            lses.append(l)
        if extra:  # the sinks (a view) or the strided keys (gathered): every query sees them all
            k_x, v_x = _gather_rows(k, v, extra, k_start)
            o, l = _attention_block(q[lo:hi], k_x, v_x, scale, False, 0, 0, None)
            outs.append(o)
            lses.append(l)
        if len(outs) == 1:
            out[lo:hi], lse[lo:hi] = outs[0], lses[0]
        elif outs:
            out[lo:hi], lse[lo:hi] = merge_partials(outs, lses)
    return out, lse


def _worth_tiling(tq: int, pattern: KeyPattern) -> bool:
    """More than one tile of queries. Even a short key block pays: the later tiles of a block of
    keys just before the queries (a ring's neighbouring unit) see none of it and are skipped."""
    return tq > tile_rows(pattern)


def _block_cover(q: torch.Tensor, k: torch.Tensor, q_start: int, k_start: int, pattern: KeyPattern) -> BlockCover:
    tq, tk = q.shape[0], k.shape[0]
    if tq == 0 or tk == 0:
        return BlockCover.EMPTY
    return pattern.cover(q_start, q_start + tq, k_start, k_start + tk)


def _gather_rows(
    k: torch.Tensor, v: torch.Tensor, ranges: list[tuple[int, int, int]], k_start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of k, v [tk, KVH, d] at the positions of (start, end, step) ranges -> [n, KVH, d]:
    a view for one contiguous range (the sinks), else one index_select each (strided keys)."""
    if len(ranges) == 1 and ranges[0][2] == 1:
        rows = slice(ranges[0][0] - k_start, ranges[0][1] - k_start)
        return k[rows], v[rows]
    index = torch.cat([torch.arange(lo - k_start, hi - k_start, step, device=k.device) for lo, hi, step in ranges])
    return k.index_select(0, index), v.index_select(0, index)


def _attention_block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, q_start: int, k_start: int,
    pattern: KeyPattern | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block without tiling: skipped if the pattern empties it, masked on the plain path if it
    cuts it, else the fused kernels (CUDA bf16/fp16) or the plain path."""
    if pattern is not None and not pattern.is_full:
        cover = _block_cover(q, k, q_start, k_start, pattern)
        if cover is BlockCover.EMPTY:
            return empty_partial(q.shape[0], q.shape[1], q.shape[2], q.device)
        if cover is BlockCover.CUT:  # masked per (query, key)
            return attention_plain(q, k, v, scale, causal=causal, q_start=q_start, k_start=k_start, pattern=pattern)
    if q.is_cuda and q.dtype in FUSED_DTYPES:
        return _attention_fused_blocks(q, k, v, scale, causal, q_start, k_start)
    return attention_plain(q, k, v, scale, causal=causal, q_start=q_start, k_start=k_start)


def attention_plain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    causal: bool = False,
    q_start: int = 0,
    k_start: int = 0,
    pattern: KeyPattern | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference path: plain torch in float32, any device, any mask offsets and pattern."""
    _check_shapes(q, k, v)
    tq, heads, dim = q.shape
    tk, kv_heads, _ = k.shape
    group = heads // kv_heads
    out, lse = empty_partial(tq, heads, dim, q.device)
    if tq == 0 or tk == 0:
        return out, lse
    k_t = k.float().permute(1, 2, 0)  # [KVH, d, tk]
    v_h = v.float().transpose(0, 1)  # [KVH, tk, d]
    k_pos = k_start + torch.arange(tk, device=q.device)
    rows = max(1, PLAIN_SCORE_ELEMENTS // (heads * tk))
    for lo in range(0, tq, rows):
        hi = min(lo + rows, tq)
        n = hi - lo
        # [n, H, d] -> [KVH, group * n, d]: each KV head meets all query heads of its group.
        q_g = q[lo:hi].float().reshape(n, kv_heads, group, dim).permute(1, 2, 0, 3)
        scores = torch.bmm(q_g.reshape(kv_heads, group * n, dim), k_t) * scale  # [KVH, group*n, tk]
        masked = pattern is not None and not pattern.is_full
        if causal or masked:
            q_pos = q_start + torch.arange(lo, hi, device=q.device)
            hidden = torch.zeros(n, tk, dtype=torch.bool, device=q.device)
            if causal:
                hidden |= k_pos[None, :] > q_pos[:, None]  # [n, tk]
            if masked:
                hidden |= pattern.hidden(q_pos, k_pos)
            scores = scores.view(kv_heads, group, n, tk).masked_fill(hidden, float("-inf"))
            scores = scores.view(kv_heads, group * n, tk)
        block_lse = torch.logsumexp(scores, dim=-1)  # [KVH, group*n]
        # Rows that saw no key: every score is -inf; subtracting 0 keeps their weights at 0.
        safe_lse = torch.where(torch.isinf(block_lse), torch.zeros_like(block_lse), block_lse)
        block_out = torch.bmm(torch.exp(scores - safe_lse.unsqueeze(-1)), v_h)  # [KVH, group*n, d]
        out[lo:hi] = block_out.view(kv_heads, group, n, dim).permute(2, 0, 1, 3).reshape(n, heads, dim)
        lse[lo:hi] = block_lse.view(kv_heads, group, n).permute(2, 0, 1).reshape(n, heads)
    return out, lse


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"want q [tq, H, d], k and v [tk, KVH, d]; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] != k.shape[2] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads must be a multiple of KV heads, same head dim: {q.shape}, {k.shape}")


def _attention_fused_blocks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, q_start: int, k_start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA: split a causal block into an unmasked past part and a square diagonal part."""
    tq, heads, dim = q.shape
    if not causal:
        return _fused_or_plain(q, k, v, scale, is_causal=False)
    n_before, n_upto = split_keys_by_position(tq, k.shape[0], q_start, k_start)
    parts = []
    if n_before > 0:
        parts.append(_fused_or_plain(q, k[:n_before], v[:n_before], scale, is_causal=False))
    if n_upto > n_before:
        square_diagonal = k_start + n_before == q_start and n_upto - n_before == tq
        if not square_diagonal:
            return attention_plain(q, k, v, scale, causal=True, q_start=q_start, k_start=k_start)
        parts.append(_fused_or_plain(q, k[n_before:n_upto], v[n_before:n_upto], scale, is_causal=True))
    if not parts:
        return empty_partial(tq, heads, dim, q.device)
    if len(parts) == 1:
        return parts[0]
    return merge_partials([o for o, _ in parts], [l for _, l in parts])


def _fused_or_plain(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, is_causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused-kernel call (is_causal: square block, top-left mask); plain torch if refused."""
    tq, heads, dim = q.shape
    if tq == 0 or k.shape[0] == 0:
        return empty_partial(tq, heads, dim, q.device)
    # [tokens, heads, d] -> [1, heads, tokens, d]: a strided view, which both kernels accept.
    q_b, k_b, v_b = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    aten = torch.ops.aten
    try:
        out, lse = aten._scaled_dot_product_cudnn_attention(
            q_b, k_b, v_b, None, True, 0.0, is_causal, False, scale=scale
        )[:2]
    except RuntimeError:
        try:
            out, lse = aten._scaled_dot_product_flash_attention(q_b, k_b, v_b, 0.0, is_causal, False, scale=scale)[:2]
        except RuntimeError:
            return attention_plain(q, k, v, scale, causal=is_causal)
    # out: [1, H, tq, d]; lse: [1, H, tq] (flash) or [1, H, tq, 1] (cuDNN), natural log.
    return out[0].transpose(0, 1).float(), lse.reshape(heads, tq).transpose(0, 1).float()
