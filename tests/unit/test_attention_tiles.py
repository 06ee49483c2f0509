"""Cut blocks computed in row tiles (issue 12 item 3, compute): each tile of queries reads only the
keys its window reaches plus the sink / strided keys before them, and the result equals the dense
masked softmax (float64 reference) for sliding, hybrid and strided patterns, windows shorter and
longer than a tile and than the block, blocks away from position 0, GQA and MQA."""

import pytest
import torch

from shared.attention.layout import zigzag_segments
from shared.attention.local import MIN_TILE_ROWS, attention_tiled, attention_with_lse, tile_rows
from shared.attention.merge import merge_partials
from shared.attention.pattern import KeyPattern, tile_keys
from shared.attention.ring import _fold_block

HEADS, DIM, SCALE = 4, 8, 0.3
RTOL, ATOL = 1e-5, 1e-6
PATTERNS = {
    "sliding_short": KeyPattern(window=5),  # far shorter than a tile (tiles of MIN_TILE_ROWS)
    "sliding_tile": KeyPattern(window=MIN_TILE_ROWS + 17),  # tiles of W rows
    "sliding_long": KeyPattern(window=700),  # longer than the blocks below: nothing to tile
    "hybrid": KeyPattern(window=40, sinks=4),
    "hybrid_big_sinks": KeyPattern(window=30, sinks=150),  # sinks reaching into a later tile's span
    "strided": KeyPattern(window=33, stride=7),
    "hybrid_strided": KeyPattern(window=50, sinks=3, stride=16),
}


def seen_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, pattern: KeyPattern) -> torch.Tensor:
    """[n, tk] bool: the definition (j <= i and in the window, a sink or a multiple of K)."""
    i, j = q_pos[:, None], k_pos[None, :]
    kept = (j > i - pattern.window) | (j < pattern.sinks)
    if pattern.stride is not None:
        kept |= j % pattern.stride == 0
    return (j <= i) & kept


def dense_reference(q, k, v, q_start, k_start, pattern):
    """float64 (out [tq, H, d], lse [tq, H]) of queries at q_start.. over keys at k_start.., GQA by repeat."""
    group = q.shape[1] // k.shape[1]
    kf, vf = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.double(), kf) * SCALE
    seen = seen_mask(q_start + torch.arange(q.shape[0]), k_start + torch.arange(k.shape[0]), pattern)
    scores = scores.masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, tq]
    weights = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("hqk,khd->qhd", weights, vf), lse.T


def close(got, want):
    out, lse = got
    want_out, want_lse = want
    torch.testing.assert_close(out.double(), want_out, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(lse.double(), want_lse, rtol=RTOL, atol=ATOL)


def qkv(tq, tk, kv_heads, seed):
    torch.manual_seed(seed)
    return torch.randn(tq, HEADS, DIM), torch.randn(tk, kv_heads, DIM), torch.randn(tk, kv_heads, DIM)


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_a_diagonal_block_in_tiles_equals_the_dense_masked_softmax(name, kv_heads):
    pattern = PATTERNS[name]
    n = 3 * MIN_TILE_ROWS + 41  # several tiles, the last one short
    q, k, v = qkv(n, n, kv_heads, seed=len(name) + kv_heads)
    want = dense_reference(q, k, v, 0, 0, pattern)
    close(attention_tiled(q, k, v, SCALE, q_start=0, k_start=0, pattern=pattern), want)
    close(attention_with_lse(q, k, v, SCALE, causal=True, pattern=pattern), want)


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("q_start,k_start,tq,tk", [
    (1000, 1000, 400, 400),  # a diagonal block far from position 0 (a ring's later unit)
    (1000, 700, 400, 300),  # keys just before the queries: the first tiles' windows reach them
    (1000, 0, 400, 600),  # keys long before: only sinks and strided keys are seen
    (1000, 900, 400, 500),  # keys before and at the queries' positions
])
def test_an_offset_block_in_tiles_equals_the_dense_masked_softmax(name, q_start, k_start, tq, tk):
    pattern = PATTERNS[name]
    q, k, v = qkv(tq, tk, 2, seed=q_start + k_start + tq)
    want = dense_reference(q, k, v, q_start, k_start, pattern)
    causal = k_start + tk > q_start
    close(attention_with_lse(q, k, v, SCALE, causal=causal, q_start=q_start, k_start=k_start, pattern=pattern), want)
    close(attention_tiled(q, k, v, SCALE, q_start=q_start, k_start=k_start, pattern=pattern), want)


@pytest.mark.parametrize("name", ["sliding_tile", "hybrid", "strided", "hybrid_strided"])
@pytest.mark.parametrize("ring", [2, 3])
def test_a_ring_fold_over_large_zigzag_units_equals_the_dense_masked_softmax(name, ring):
    """Units of several tiles, folded as every member of a ring folds them (blocks not at 0)."""
    pattern = PATTERNS[name]
    unit = 2 * MIN_TILE_ROWS + 30
    n = 2 * ring * unit
    q, k, v = qkv(n, n, 2, seed=ring)
    want_out, want_lse = dense_reference(q, k, v, 0, 0, pattern)
    members = zigzag_segments(n, unit, ring)
    rows_of = lambda segments: torch.cat([torch.arange(lo, hi) for lo, hi in segments])  # noqa: E731
    for me in members:
        mine = rows_of(me)
        out, lse = torch.zeros(len(mine), HEADS, DIM), torch.full((len(mine), HEADS), float("-inf"))
        for source in members:
            keys = rows_of(source)
            out, lse, _, _ = _fold_block(out, lse, q[mine], me, k[keys], v[keys], source, SCALE, pattern)
        close((out, lse), (want_out[mine], want_lse[mine]))


def test_tile_keys_hold_every_seen_pair_and_the_extras_are_seen_by_every_query():
    """tile_keys against the definition: outside the span nothing but the extras is seen, and
    every extra key is seen by every query of the tile (so its partial needs no mask)."""
    for pattern in PATTERNS.values():
        for q_lo, q_hi, k_lo, k_hi in ((0, 64, 0, 64), (300, 364, 0, 364), (300, 364, 100, 250), (300, 364, 310, 500)):
            (span_lo, span_hi), extra = tile_keys(pattern, q_lo, q_hi, k_lo, k_hi)
            assert k_lo <= span_lo <= span_hi <= k_hi
            k_pos = torch.arange(k_lo, k_hi)
            seen = seen_mask(torch.arange(q_lo, q_hi), k_pos, pattern)
            extra_pos = torch.tensor([j for lo, hi, step in extra for j in range(lo, hi, step)], dtype=torch.long)
            assert (extra_pos < span_lo).all() and len(set(extra_pos.tolist())) == len(extra_pos)
            in_span = (k_pos >= span_lo) & (k_pos < span_hi)
            is_extra = torch.isin(k_pos, extra_pos)
            assert not seen[:, ~(in_span | is_extra)].any(), (pattern, q_lo, k_lo)
            assert seen[:, is_extra].all(), (pattern, q_lo, k_lo)


def test_tiles_read_keys_in_proportion_to_the_window_not_the_block():
    """The keys a long diagonal block's tiles read: about tokens x (tile + W), strided adds tokens / K."""
    n, window, stride = 4096, 256, 64
    for pattern, bound in ((KeyPattern(window=window, sinks=4), 2 * window + 4),
                           (KeyPattern(window=window, stride=stride), 2 * window + n // stride)):
        rows = tile_rows(pattern)
        read = 0
        for lo in range(0, n, rows):
            (span_lo, span_hi), extra = tile_keys(pattern, lo, lo + rows, 0, n)
            read += rows * (span_hi - span_lo + sum(len(range(*r)) for r in extra))
        assert read <= n * bound and read < n * n / 4


def test_short_key_blocks_and_blocks_of_one_tile_merge_to_the_dense_masked_softmax():
    """Queries of one tile take the dense masked path, longer ones are tiled even over a short key
    block (its later tiles see none of it); the partials of disjoint key blocks merge exactly."""
    pattern = PATTERNS["hybrid"]
    n = MIN_TILE_ROWS + 200
    q, k, v = qkv(n, n, 2, seed=7)
    want_out, want_lse = dense_reference(q, k, v, 0, 0, pattern)
    for q_lo, q_hi in ((0, MIN_TILE_ROWS), (MIN_TILE_ROWS, n), (0, n)):
        parts = [attention_with_lse(q[q_lo:q_hi], k[lo:hi], v[lo:hi], SCALE, causal=True, q_start=q_lo, k_start=lo,
                                    pattern=pattern) for lo, hi in ((0, 60), (60, 100), (100, n))]
        close(merge_partials([o for o, _ in parts], [l for _, l in parts]), (want_out[q_lo:q_hi], want_lse[q_lo:q_hi]))
