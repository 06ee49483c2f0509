"""Paged decode attention: the reference against dense attention over contiguous rows, gather_rows,
and (on a CUDA GPU) the Triton kernel against the reference, also replayed from a CUDA graph."""

from __future__ import annotations

import math

import pytest
import torch

from shared.attention.local import attention_with_lse
from shared.attention.paged import (
    gather_rows,
    kernel_supports,
    paged_decode_attention,
    paged_decode_attention_reference,
)

TOLERANCE = 1e-5
BF16_TOLERANCE = 1e-2


def make_cache(lens, heads, kv_heads, dim, page, dtype=torch.float32, device="cpu", spare_pages=3, seed=0):
    """Random contiguous K/V per sequence, scattered into a pool over shuffled page ids.

    -> q [B, H, d], k_pool, v_pool [pages, KVH, P, d], block_table [B, max_pages] int32,
       seq_lens [B] int32, and the contiguous (k [n, KVH, d], v) of each sequence."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // page) for n in lens]
    max_pages = max(max(need), 1)
    n_pool = sum(need) + spare_pages
    ids = torch.randperm(n_pool, generator=g)
    k_pool = torch.randn(n_pool, kv_heads, page, dim, generator=g, dtype=dtype)  # unused pages: noise
    v_pool = torch.randn(n_pool, kv_heads, page, dim, generator=g, dtype=dtype)
    table = torch.full((len(lens), max_pages), n_pool - 1, dtype=torch.int32)  # padding: any valid id
    dense = []
    used = 0
    for b, n in enumerate(lens):
        k = torch.randn(n, kv_heads, dim, generator=g, dtype=dtype)
        v = torch.randn(n, kv_heads, dim, generator=g, dtype=dtype)
        for r in range(need[b]):
            pid = int(ids[used])
            used += 1
            table[b, r] = pid
            rows = slice(r * page, min((r + 1) * page, n))
            k_pool[pid, :, : rows.stop - rows.start] = k[rows].transpose(0, 1)
            v_pool[pid, :, : rows.stop - rows.start] = v[rows].transpose(0, 1)
        dense.append((k, v))
    q = torch.randn(len(lens), heads, dim, generator=g, dtype=dtype)
    to = dict(device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return q.to(**to), k_pool.to(**to), v_pool.to(**to), table.to(**to), seq_lens.to(**to), dense


def definition(q, k, v, scale):
    """float64 attention of q [H, d] over k, v [n, KVH, d] from the definition -> (out [H, d], lse [H])."""
    group = q.shape[0] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("hd,nhd->hn", q.double(), k) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.einsum("hn,nhd->hd", torch.exp(scores - lse[:, None]), v), lse


PAGE = 4
LENS = [0, 1, PAGE, PAGE + 1, 3 * PAGE - 1, 5 * PAGE + 2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 1)])
def test_reference_matches_dense_attention(heads, kv_heads, dtype):
    dim = 16
    scale = 1 / math.sqrt(dim)
    q, k_pool, v_pool, table, seq_lens, dense = make_cache(LENS, heads, kv_heads, dim, PAGE, dtype)
    out, lse = paged_decode_attention(q, k_pool, v_pool, table, seq_lens, scale)
    assert out.shape == (len(LENS), heads, dim) and lse.shape == (len(LENS), heads)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    for b, (k, v) in enumerate(dense):
        if LENS[b] == 0:
            assert (out[b] == 0).all() and (lse[b] == float("-inf")).all()
            continue
        # Exactly the non-paged path: the same function over the same contiguous rows.
        ref_out, ref_lse = attention_with_lse(q[b : b + 1], k, v, scale)
        assert torch.equal(out[b], ref_out[0]) and torch.equal(lse[b], ref_lse[0])
        def_out, def_lse = definition(q[b], k, v, scale)
        assert (out[b].double() - def_out).abs().max() <= TOLERANCE * def_out.abs().max().clamp(min=1)
        assert (lse[b].double() - def_lse).abs().max() <= TOLERANCE * (1 + def_lse.abs().max())


def test_reference_is_the_cpu_default():
    q, k_pool, v_pool, table, seq_lens, _ = make_cache(LENS, 4, 2, 16, PAGE)
    assert not kernel_supports(q, k_pool, v_pool)
    got = paged_decode_attention(q, k_pool, v_pool, table, seq_lens, 0.25)
    want = paged_decode_attention_reference(q, k_pool, v_pool, table, seq_lens, 0.25)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_gather_rows_off_page_boundaries():
    n = 5 * PAGE + 3
    _, k_pool, _, table, _, dense = make_cache([n], 2, 2, 8, PAGE)
    k = dense[0][0]
    pages = table[0]
    for lo, hi in [(0, n), (1, n - 1), (PAGE - 1, PAGE + 1), (PAGE + 2, 3 * PAGE + 1), (2 * PAGE, 3 * PAGE), (n - 1, n)]:
        assert torch.equal(gather_rows(k_pool, pages, lo, hi), k[lo:hi])
        assert torch.equal(gather_rows(k_pool, pages.tolist(), lo, hi), k[lo:hi])
    assert gather_rows(k_pool, pages, 3, 3).shape == (0, 2, 8)


def test_shape_errors():
    q, k_pool, v_pool, table, seq_lens, _ = make_cache([3], 6, 4, 8, PAGE)
    with pytest.raises(ValueError):
        paged_decode_attention(q, k_pool, v_pool, table, seq_lens, 0.5)  # 6 heads over 4 KV heads


def assert_close_bf16(got, want):
    out, lse = got
    ref_out, ref_lse = want
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert (out - ref_out).abs().max() <= BF16_TOLERANCE * ref_out.abs().max().clamp(min=1)
    finite = ~torch.isinf(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max() <= BF16_TOLERANCE * (1 + ref_lse[finite].abs().max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads,kv_heads,dim,page", [(8, 2, 64, 16), (32, 8, 128, 256), (4, 1, 128, 64)])
def test_triton_matches_reference_and_replays_from_a_graph(heads, kv_heads, dim, page):
    pytest.importorskip("triton")
    scale = 1 / math.sqrt(dim)
    lens = [0, 1, page, page + 1, 7 * page + 5, 40 * page - 1]
    q, k_pool, v_pool, table, seq_lens, _ = make_cache(lens, heads, kv_heads, dim, page, torch.bfloat16, "cuda")
    assert kernel_supports(q, k_pool, v_pool)
    want = paged_decode_attention_reference(q, k_pool, v_pool, table, seq_lens, scale)
    assert_close_bf16(paged_decode_attention(q, k_pool, v_pool, table, seq_lens, scale), want)
    assert_close_bf16(paged_decode_attention(q, k_pool, v_pool, table, seq_lens, scale, splits=1), want)
    column_major = table.t().contiguous().t()  # same values, row stride 1: strides are honoured
    assert_close_bf16(paged_decode_attention(q, k_pool, v_pool, column_major, seq_lens, scale), want)
    out, lse = paged_decode_attention(q[:0], k_pool, v_pool, table[:0], seq_lens[:0], scale)
    assert out.shape == (0, heads, dim) and lse.shape == (0, heads)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = paged_decode_attention(q, k_pool, v_pool, table, seq_lens, scale)
    # New lengths and page lists, written in place: the captured launch must follow them.
    seq_lens.copy_(torch.tensor([5 * page + 3, 0, 2, page, page - 1, 33 * page], dtype=torch.int32))
    table.copy_(table.flip(0))  # every row still lists enough valid pages (reversed rows)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_bf16(got, paged_decode_attention_reference(q, k_pool, v_pool, table, seq_lens, scale))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("heads,kv_heads,dim,page", [(8, 2, 64, 16), (32, 8, 128, 256)])
def test_triton_with_window_starts_matches_reference(heads, kv_heads, dim, page):
    """Sliding windows: rows before each sequence's start are not attended; a start at or past
    its length (every row left the window, a ring member's shard) gives an empty partial."""
    pytest.importorskip("triton")
    scale = 1 / math.sqrt(dim)
    lens = [1, page + 1, 7 * page + 5, 40 * page - 1, 3 * page, 2 * page]
    starts = [0, 1, 3 * page + 2, 39 * page, 3 * page, 2 * page + 7]
    q, k_pool, v_pool, table, seq_lens, _ = make_cache(lens, heads, kv_heads, dim, page, torch.bfloat16, "cuda")
    seq_starts = torch.tensor(starts, dtype=torch.int32, device="cuda")
    want = paged_decode_attention_reference(q, k_pool, v_pool, table, seq_lens, scale, seq_starts)
    assert_close_bf16(paged_decode_attention(q, k_pool, v_pool, table, seq_lens, scale, seq_starts=seq_starts), want)
    assert_close_bf16(paged_decode_attention(q, k_pool, v_pool, table, seq_lens, scale, splits=1,
                                             seq_starts=seq_starts), want)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = paged_decode_attention(q, k_pool, v_pool, table, seq_lens, scale, seq_starts=seq_starts)
    seq_starts.copy_(torch.tensor([0, 0, page, 20 * page + 3, 0, 0], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_bf16(got, paged_decode_attention_reference(q, k_pool, v_pool, table, seq_lens, scale, seq_starts))


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 1)])
def test_without_lse_one_fused_call_gives_the_reference_output(heads, kv_heads):
    """The path of a batch with nothing to merge: the rows of every sequence gathered to the
    widest one's length, the rest masked, one SDPA call."""
    lens = [1, PAGE, PAGE + 1, 5 * PAGE + 2]  # every sequence has a row: a decode token sees itself
    q, k_pool, v_pool, table, seq_lens, _ = make_cache(lens, heads, kv_heads, 16, PAGE, seed=3)
    out, lse = paged_decode_attention(q, k_pool, v_pool, table, seq_lens, 0.25, need_lse=False)
    ref_out, _ = paged_decode_attention_reference(q, k_pool, v_pool, table, seq_lens, 0.25)
    assert lse is None and out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=TOLERANCE, rtol=TOLERANCE)
