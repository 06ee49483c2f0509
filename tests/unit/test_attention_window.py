"""Sliding-window attention: blocks of keys, masked by global positions, merge to the dense
masked softmax (a query at i sees keys j with i - W < j <= i), in prefill and paged decode."""

import pytest
import torch

from shared.attention.local import attention_with_lse
from shared.attention.merge import merge_partials
from shared.attention.paged import paged_decode_attention, paged_key_attention_mass
from shared.attention.pattern import KeyPattern

HEADS, KV_HEADS, DIM, SCALE = 4, 2, 8, 0.3


def dense_windowed(q, k, v, q_start, window):
    """Reference in float64: causal softmax over keys at 0..n-1 with a window, GQA by repeat."""
    kf = k.double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    vf = v.double().repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kf) * SCALE
    qp = q_start + torch.arange(q.shape[0])[:, None]
    kp = torch.arange(k.shape[0])[None, :]
    scores = scores.masked_fill((kp > qp) | (kp <= qp - window), float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vf)


@pytest.mark.parametrize("window", [1, 3, 8, 100])
def test_key_blocks_with_a_window_merge_to_the_dense_windowed_softmax(window):
    torch.manual_seed(window)
    n = 30
    q, k, v = torch.randn(n, HEADS, DIM), torch.randn(n, KV_HEADS, DIM), torch.randn(n, KV_HEADS, DIM)
    expected = dense_windowed(q, k, v, 0, window)
    for q_lo, q_hi in ((0, 7), (7, 19), (19, 30)):  # query blocks against key blocks, as a ring folds them
        outs, lses = [], []
        for k_lo, k_hi in ((0, 5), (5, 12), (12, 30)):
            o, l = attention_with_lse(q[q_lo:q_hi], k[k_lo:k_hi], v[k_lo:k_hi], SCALE, causal=k_hi > q_lo,
                                      q_start=q_lo, k_start=k_lo, pattern=KeyPattern(window=window))
            outs.append(o)
            lses.append(l)
        out, _ = merge_partials(outs, lses)
        torch.testing.assert_close(out.double(), expected[q_lo:q_hi], rtol=1e-5, atol=1e-6)


def test_a_block_entirely_before_the_window_is_empty():
    q, k = torch.randn(2, HEADS, DIM), torch.randn(3, KV_HEADS, DIM)
    out, lse = attention_with_lse(q, k, k, SCALE, causal=False, q_start=10, k_start=0, pattern=KeyPattern(window=4))
    assert torch.isinf(lse).all() and (lse < 0).all() and float(out.abs().sum()) == 0.0


def test_paged_decode_attends_from_the_window_start():
    torch.manual_seed(0)
    page, lens, starts = 4, [11, 6, 9], [5, 0, 9]  # the last sequence: every row left the window
    pool_k, pool_v = torch.randn(12, KV_HEADS, page, DIM), torch.randn(12, KV_HEADS, page, DIM)
    table = torch.tensor([[3, 7, 1], [2, 9, 0], [5, 4, 11]], dtype=torch.int32)
    q = torch.randn(3, HEADS, DIM)
    seq_lens, seq_starts = torch.tensor(lens, dtype=torch.int32), torch.tensor(starts, dtype=torch.int32)
    out, lse = paged_decode_attention(q, pool_k, pool_v, table, seq_lens, SCALE, seq_starts=seq_starts)
    sdpa, _ = paged_decode_attention(q, pool_k, pool_v, table, seq_lens, SCALE, seq_starts=seq_starts,
                                     need_lse=False)
    for b, (n, s) in enumerate(zip(lens, starts)):
        rows = pool_k[table[b].long()].transpose(1, 2).reshape(-1, KV_HEADS, DIM)
        vals = pool_v[table[b].long()].transpose(1, 2).reshape(-1, KV_HEADS, DIM)
        if n <= s:
            assert torch.isinf(lse[b]).all()
            continue
        ref, ref_lse = attention_with_lse(q[b : b + 1], rows[s:n], vals[s:n], SCALE)
        torch.testing.assert_close(out[b], ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse[b], ref_lse[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sdpa[b], ref[0], rtol=1e-5, atol=1e-6)
    mass = paged_key_attention_mass(q, pool_k, table, seq_lens, SCALE, seq_starts=seq_starts)
    assert float(mass[0, :5].abs().sum()) == 0.0 and abs(float(mass[0].sum()) - HEADS) < 1e-4
