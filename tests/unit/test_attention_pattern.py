"""Per-request attention patterns (sliding, hybrid, strided), exact: blocks of keys masked by
global positions and folded as a ring folds them, paged decode over a window plus the gathered
sink / strided rows, and the sparsity a pattern reaches, all against dense float64 references."""

import pytest
import torch

from shared.attention.layout import zigzag_segments
from shared.attention.local import attention_with_lse
from shared.attention.merge import merge_partials
from shared.attention.paged import paged_decode_attention, paged_rows_attention
from shared.attention.pattern import (
    BlockCover,
    KeyPattern,
    attention_sparsity,
    extra_key_rows,
    keys_seen,
    layer_pattern,
)
from shared.attention.ring import _fold_block, ring_attention

HEADS, KV_HEADS, DIM, SCALE = 4, 2, 8, 0.3
PATTERNS = {
    "sliding": KeyPattern(window=5),
    "hybrid": KeyPattern(window=4, sinks=3),
    "strided": KeyPattern(window=3, stride=4),
    "hybrid_strided": KeyPattern(window=6, sinks=2, stride=5),
    "window_past_the_prompt": KeyPattern(window=100, sinks=2),
}


def dense_mask(n_queries: int, q_start: int, n_keys: int, pattern: KeyPattern) -> torch.Tensor:
    """[n_queries, n_keys] bool, True where a query sees a key: the definition, pair by pair."""
    seen = torch.zeros(n_queries, n_keys, dtype=torch.bool)
    for a in range(n_queries):
        i = q_start + a
        for j in range(min(i + 1, n_keys)):
            seen[a, j] = (j > i - pattern.window or j < pattern.sinks
                          or (pattern.stride is not None and j % pattern.stride == 0))
    return seen


def dense_reference(q, k, v, q_start, pattern):
    """float64 softmax over the keys `dense_mask` keeps, GQA by repeat."""
    kf = k.double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    vf = v.double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kf) * SCALE
    scores = scores.masked_fill(~dense_mask(q.shape[0], q_start, k.shape[0], pattern), float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vf)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_key_blocks_merge_to_the_dense_masked_softmax(name):
    pattern = PATTERNS[name]
    torch.manual_seed(len(name))
    n = 31
    q, k, v = torch.randn(n, HEADS, DIM), torch.randn(n, KV_HEADS, DIM), torch.randn(n, KV_HEADS, DIM)
    expected = dense_reference(q, k, v, 0, pattern)
    for q_lo, q_hi in ((0, 7), (7, 19), (19, 31)):
        outs, lses = [], []
        for k_lo, k_hi in ((0, 2), (2, 5), (5, 12), (12, 20), (20, 31)):
            o, l = attention_with_lse(q[q_lo:q_hi], k[k_lo:k_hi], v[k_lo:k_hi], SCALE, causal=k_hi > q_lo,
                                      q_start=q_lo, k_start=k_lo, pattern=pattern)
            outs.append(o)
            lses.append(l)
        out, _ = merge_partials(outs, lses)
        torch.testing.assert_close(out.double(), expected[q_lo:q_hi], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("ring", [2, 3])
def test_a_ring_fold_over_zigzag_segments_equals_the_dense_masked_softmax(name, ring):
    """Every member's queries against every member's key block, as ring_attention folds them."""
    pattern = PATTERNS[name]
    torch.manual_seed(ring)
    n, unit = 40, 3
    q, k, v = torch.randn(n, HEADS, DIM), torch.randn(n, KV_HEADS, DIM), torch.randn(n, KV_HEADS, DIM)
    expected = dense_reference(q, k, v, 0, pattern)
    members = zigzag_segments(n, unit, ring)  # [(start, end), ...] per member
    rows_of = lambda segs: torch.cat([torch.arange(s, e) for s, e in segs])  # noqa: E731
    skipped_any = False
    for me in members:
        mine = rows_of(me)
        out = torch.zeros(len(mine), HEADS, DIM)
        lse = torch.full((len(mine), HEADS), float("-inf"))
        for source in members:
            keys = rows_of(source)
            out, lse, skipped, pairs = _fold_block(out, lse, q[mine], me, k[keys], v[keys], source, SCALE, pattern)
            assert 0 <= skipped <= pairs == len(me) * len(source)
            skipped_any |= skipped > 0
        torch.testing.assert_close(out.double(), expected[mine], rtol=1e-5, atol=1e-6)
    assert skipped_any  # causality alone skips blocks on a ring of 2 or more


def test_block_cover_agrees_with_the_dense_mask():
    """EMPTY: no causal pair kept; WHOLE: every causal pair kept; CUT: some of each (or none causal)."""
    for pattern in PATTERNS.values():
        for q_lo, q_hi, k_lo, k_hi in ((20, 25, 0, 3), (20, 25, 5, 9), (20, 25, 14, 18), (20, 25, 18, 25),
                                       (30, 31, 0, 31), (9, 12, 1, 4), (40, 44, 33, 36)):
            seen = dense_mask(q_hi - q_lo, q_lo, k_hi, pattern)[:, k_lo:]
            causal = dense_mask(q_hi - q_lo, q_lo, k_hi, KeyPattern(window=10**9))[:, k_lo:]
            cover = pattern.cover(q_lo, q_hi, k_lo, k_hi)
            if cover is BlockCover.EMPTY:
                assert not seen.any(), (pattern, q_lo, k_lo)
            elif cover is BlockCover.WHOLE:
                assert torch.equal(seen, causal), (pattern, q_lo, k_lo)
            else:
                assert seen.any() and not torch.equal(seen, causal), (pattern, q_lo, k_lo)


def test_a_sliding_pattern_empties_blocks_before_the_window_and_sinks_or_strides_keep_some():
    assert KeyPattern(window=4).cover(20, 25, 5, 9) is BlockCover.EMPTY
    assert KeyPattern(window=4, sinks=6).cover(20, 25, 5, 9) is BlockCover.CUT
    assert KeyPattern(window=4, stride=8).cover(20, 25, 5, 9) is BlockCover.CUT  # key 8
    assert KeyPattern(window=4, stride=10).cover(20, 25, 5, 9) is BlockCover.EMPTY
    assert KeyPattern(window=4, sinks=10).cover(20, 25, 5, 9) is BlockCover.WHOLE  # every key a sink


def test_extra_key_rows_follow_a_members_runs():
    """Rows of the sink and strided positions before the window, in a shard whose runs skip."""
    runs = [(0, 3), (9, 14), (20, 24)]  # rows 0-2, 3-7, 8-11
    hybrid = KeyPattern(window=5, sinks=2)
    assert extra_key_rows(hybrid, runs, 22) == [0, 1]  # positions 0, 1; window from 18
    strided = KeyPattern(window=5, stride=4)
    assert extra_key_rows(strided, runs, 22) == [0, 6]  # positions 0, 12 (4, 8, 16 are elsewhere)
    both = KeyPattern(window=3, sinks=1, stride=10)
    assert extra_key_rows(both, runs, 23) == [0, 4, 8]  # positions 0, 10, 20 (window from 21)
    assert extra_key_rows(KeyPattern(window=5), runs, 22) == []
    assert extra_key_rows(hybrid, runs, 3) == []  # nothing left the window yet


# (device, dtype, page tokens, tolerance): the reference path; the Triton kernel (pages of 16+)
PAGED_CASES = [("cpu", torch.float32, 4, 1e-6),
               pytest.param("cuda", torch.bfloat16, 16, 2e-2,
                            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device, dtype, page, tolerance", PAGED_CASES)
@pytest.mark.parametrize("name", ["hybrid", "strided", "hybrid_strided"])
def test_paged_decode_over_the_window_and_the_extra_rows_equals_the_dense_masked_softmax(
        name, device, dtype, page, tolerance):
    """Each sequence's rows are a ring member's shard (runs of positions); its query attends the
    window's suffix of rows (seq_starts) and its gathered sink / strided rows, merged."""
    pattern = PATTERNS[name]
    torch.manual_seed(3)
    shards = [[(0, 10), (30, 37)], [(0, 23)], [(10, 20), (25, 29)]]  # runs of positions, rows in order
    queries = [36, 22, 28]  # each the position of the sequence's last row
    lens = [sum(e - s for s, e in runs) for runs in shards]
    pool_k, pool_v = torch.randn(30, KV_HEADS, page, DIM), torch.randn(30, KV_HEADS, page, DIM)
    table = torch.tensor([[3, 7, 1, 9, 12, 14, 2], [2, 8, 11, 4, 6, 15, 0], [5, 10, 13, 16, 0, 0, 0]],
                         dtype=torch.int32)
    q = torch.randn(3, HEADS, DIM)

    def rows_through(runs, position):
        return sum(max(0, min(e, position + 1) - s) for s, e in runs)

    starts = [rows_through(runs, i - pattern.window) for runs, i in zip(shards, queries)]
    extras = [extra_key_rows(pattern, runs, i) for runs, i in zip(shards, queries)]
    width = max(len(x) for x in extras)
    rows = torch.zeros(3, width, dtype=torch.long)
    valid = torch.zeros(3, width, dtype=torch.bool)
    for b, x in enumerate(extras):
        rows[b, : len(x)], valid[b, : len(x)] = torch.tensor(x, dtype=torch.long), True
    seq_lens, seq_starts = torch.tensor(lens, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32)
    pool_k, pool_v, q = (x.to(device, dtype) for x in (pool_k, pool_v, q))
    on = [x.to(device) for x in (table, seq_lens, seq_starts, rows, valid)]
    window_out, window_lse = paged_decode_attention(q, pool_k, pool_v, on[0], on[1], SCALE, seq_starts=on[2])
    extra_out, extra_lse = paged_rows_attention(q, pool_k, pool_v, on[0], on[3], on[4], SCALE)
    out, lse = merge_partials([window_out, extra_out], [window_lse, extra_lse])
    pool_k, pool_v, q, out = (x.cpu().float() for x in (pool_k, pool_v, q, out))
    assert valid.any()
    for b, (runs, i) in enumerate(zip(shards, queries)):
        k_rows = pool_k[table[b].long()].transpose(1, 2).reshape(-1, KV_HEADS, DIM)[: lens[b]]
        v_rows = pool_v[table[b].long()].transpose(1, 2).reshape(-1, KV_HEADS, DIM)[: lens[b]]
        positions = torch.cat([torch.arange(s, e) for s, e in runs])
        keep = dense_mask(1, i, int(positions.max()) + 1, pattern)[0, positions]  # [rows] of this shard
        # the kept rows, all of them seen: a query after the last of them, no window
        expected = dense_reference(q[b : b + 1], k_rows[keep], v_rows[keep], int(keep.sum()), KeyPattern(window=10**9))
        torch.testing.assert_close(out[b].double(), expected[0], rtol=tolerance, atol=tolerance)


def test_keys_seen_counts_the_dense_mask():
    for pattern in [*PATTERNS.values(), KeyPattern(window=1), KeyPattern(window=2, stride=1)]:
        n = 50
        expected = dense_mask(n, 0, n, pattern).sum(dim=1)
        assert torch.equal(keys_seen(pattern, torch.arange(n)), expected), pattern
    assert torch.equal(keys_seen(None, torch.arange(4)), torch.tensor([1, 2, 3, 4]))


def test_sparsity_is_the_skipped_fraction_of_the_causal_matrix():
    pattern = KeyPattern(window=4, sinks=2)
    prompt, generated = 30, 6  # queries at 0..34: the last generated token is never fed back
    mask = dense_mask(prompt + generated - 1, 0, prompt + generated - 1, pattern)
    causal = (prompt + generated - 1) * (prompt + generated) // 2
    assert attention_sparsity([pattern], prompt, generated) == pytest.approx(1 - int(mask.sum()) / causal)
    # layers average: one full layer halves it
    assert attention_sparsity([pattern, None], prompt, generated) == pytest.approx(
        (1 - int(mask.sum()) / causal) / 2)
    assert attention_sparsity([None, KeyPattern()], 1000, 10) == 0.0
    assert attention_sparsity([pattern], 0, 0) == 0.0


def test_hybrid_attention_over_a_long_prompt_skips_most_of_the_matrix():
    """The issue's CPU case: 4 sinks and a window of 256 over 3,000 tokens skip >= 80%."""
    assert attention_sparsity([KeyPattern(window=256, sinks=4)] * 2, 3000, 16) >= 0.8


def test_a_request_pattern_applies_in_every_layer_and_the_model_window_in_its_sliding_layers():
    mine = KeyPattern(window=8, sinks=2)
    assert layer_pattern(mine, None) is mine and layer_pattern(mine, 8) is mine
    assert layer_pattern(None, 8) == KeyPattern(window=8) and layer_pattern(None, None) is None
    assert layer_pattern(KeyPattern(), None) is None  # full


def test_invalid_sizes_are_refused():
    for bad in ({"window": 0}, {"window": 3, "sinks": -1}, {"window": 3, "stride": 0}):
        with pytest.raises(ValueError):
            KeyPattern(**bad)


def test_a_ring_step_reports_the_blocks_it_skipped():
    """Three segments on a ring of one: 9 (query, key) segment pairs, 3 with keys after the
    queries; a window of 4 also empties the one whose keys all left it (queries 20-29 against keys
    0-9; 10-19 against 0-9 still reaches key 9 from query 10), sinks keep it."""
    torch.manual_seed(0)
    n = 30
    q, k, v = torch.randn(n, HEADS, DIM), torch.randn(n, KV_HEADS, DIM), torch.randn(n, KV_HEADS, DIM)
    segments = [[(0, 10), (10, 20), (20, 30)]]
    for pattern, skipped in ((None, 3), (KeyPattern(window=4), 4), (KeyPattern(window=4, sinks=2), 3)):
        steps = []
        out, _ = ring_attention(q, k, v, scale=SCALE, kv_segments=segments, ring_ranks=[0], on_step=steps.append,
                                pattern=pattern)
        assert [(s.blocks, s.blocks_skipped) for s in steps] == [(9, skipped)], pattern
        torch.testing.assert_close(out.double(), dense_reference(q, k, v, 0, pattern or KeyPattern(window=10**9)),
                                   rtol=1e-5, atol=1e-6)
