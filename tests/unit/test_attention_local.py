"""attention_with_lse against a float64 reference written out from the definition."""

from __future__ import annotations

import math

import pytest
import torch

from shared.attention import local
from shared.attention.decode import decode_partial
from shared.attention.local import attention_plain, attention_with_lse, split_keys_by_position
from shared.attention.merge import merge_partials

TOLERANCE = 1e-5


def reference(q, k, v, scale, *, causal=False, q_start=0, k_start=0):
    """float64, K/V repeated per query head, mask by positions."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)  # [tk, H, d]
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale  # [H, tq, tk]
    if causal:
        q_pos = q_start + torch.arange(q.shape[0])
        k_pos = k_start + torch.arange(k.shape[0])
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [H, tq]
    weights = torch.nan_to_num(torch.exp(scores - lse.unsqueeze(-1)))  # rows with no key: 0
    out = torch.einsum("hqk,khd->qhd", weights, v)
    return out, lse.transpose(0, 1)


def qkv(tq, tk, heads, kv_heads, dim, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, heads, dim, generator=g, dtype=dtype)
    k = torch.randn(tk, kv_heads, dim, generator=g, dtype=dtype)
    v = torch.randn(tk, kv_heads, dim, generator=g, dtype=dtype)
    return q, k, v


def assert_close(got, want, tol=TOLERANCE):
    out, lse = got
    ref_out, ref_lse = want
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = ~torch.isinf(ref_lse)
    if not finite.any():
        assert (out == 0).all()
        return
    assert (lse[finite].double() - ref_lse[finite]).abs().max() <= tol * (1 + ref_lse[finite].abs().max())
    assert (out.double() - ref_out).abs().max() <= tol * ref_out.abs().max().clamp(min=1)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize(
    "causal,q_start,k_start,tq,tk",
    [
        (False, 0, 0, 9, 13),  # full block
        (True, 0, 0, 11, 11),  # diagonal block
        (True, 20, 3, 7, 12),  # keys entirely before the queries
        (True, 5, 0, 6, 9),  # past keys and part of the diagonal
        (True, 4, 6, 8, 10),  # keys start inside the query range
        (True, 0, 30, 5, 4),  # keys entirely after: nothing seen
    ],
)
def test_matches_reference(heads, kv_heads, causal, q_start, k_start, tq, tk):
    q, k, v = qkv(tq, tk, heads, kv_heads, dim=8)
    scale = 1 / math.sqrt(8)
    got = attention_with_lse(q, k, v, scale, causal=causal, q_start=q_start, k_start=k_start)
    assert_close(got, reference(q, k, v, scale, causal=causal, q_start=q_start, k_start=k_start))


def test_query_chunking_gives_the_same_result(monkeypatch):
    q, k, v = qkv(23, 17, 4, 2, 8, seed=1)
    whole = attention_plain(q, k, v, 0.3, causal=True, q_start=10, k_start=0)
    # 4 heads x 17 keys x 3 rows: forces 8 query chunks, the last one shorter.
    monkeypatch.setattr(local, "PLAIN_SCORE_ELEMENTS", 4 * 17 * 3)
    chunked = attention_plain(q, k, v, 0.3, causal=True, q_start=10, k_start=0)
    assert torch.allclose(whole[0], chunked[0], atol=1e-6)
    assert torch.allclose(whole[1], chunked[1], atol=1e-6)


def test_partials_over_split_keys_merge_to_the_whole():
    q, k, v = qkv(12, 12, 4, 1, 8, seed=2)
    scale = 0.35
    whole = attention_with_lse(q, k, v, scale, causal=True)
    first = attention_with_lse(q, k[:5], v[:5], scale, causal=True, k_start=0)
    second = attention_with_lse(q, k[5:], v[5:], scale, causal=True, k_start=5)
    merged = merge_partials([first[0], second[0]], [first[1], second[1]])
    assert torch.allclose(merged[0], whole[0], atol=1e-6)
    assert torch.allclose(merged[1], whole[1], atol=1e-6)
    # Queries 0..4 saw no key of the second block.
    assert torch.isinf(second[1][:5]).all() and (second[0][:5] == 0).all()


def test_empty_key_block():
    q, k, v = qkv(3, 0, 2, 1, 4)
    out, lse = attention_with_lse(q, k, v, 0.5)
    assert out.shape == (3, 2, 4) and (out == 0).all() and torch.isinf(lse).all()


def test_rejects_bad_head_counts():
    q, k, v = qkv(3, 3, 3, 2, 4)
    with pytest.raises(ValueError):
        attention_with_lse(q, k, v, 0.5)


def test_decode_partial_sees_every_cached_key():
    q, k, v = qkv(1, 40, 8, 2, 16, seed=3)
    got = decode_partial(q, k, v, 0.25)
    assert_close(got, reference(q, k, v, 0.25))


@pytest.mark.parametrize(
    "tq,tk,q_start,k_start,want",
    [
        (4, 6, 10, 0, (6, 6)),  # all keys before
        (4, 6, 0, 10, (0, 0)),  # all keys after
        (4, 4, 8, 8, (0, 4)),  # square diagonal
        (4, 10, 6, 0, (6, 10)),  # 6 past keys, then the diagonal
        (4, 10, 6, 2, (4, 8)),  # 4 past, 4 diagonal, 2 future
    ],
)
def test_split_keys_by_position(tq, tk, q_start, k_start, want):
    assert split_keys_by_position(tq, tk, q_start, k_start) == want


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused CUDA path needs a GPU")
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 128), (4, 1, 64), (4, 4, 16)])
@pytest.mark.parametrize(
    "causal,q_start,k_start,tq,tk",
    [(False, 0, 0, 70, 130), (True, 0, 0, 96, 96), (True, 100, 0, 40, 140), (True, 100, 40, 40, 120),
     (True, 10, 20, 30, 30), (True, 0, 50, 10, 10)],
)
def test_cuda_fused_path_matches_reference(heads, kv_heads, dim, causal, q_start, k_start, tq, tk):
    q, k, v = qkv(tq, tk, heads, kv_heads, dim, seed=4)
    scale = 1 / math.sqrt(dim)
    bf = [x.to("cuda", torch.bfloat16) for x in (q, k, v)]
    out, lse = attention_with_lse(*bf, scale, causal=causal, q_start=q_start, k_start=k_start)
    # bf16 inputs: compare with the reference on the same rounded inputs, at bf16 accuracy.
    ref = reference(*[x.cpu() for x in bf], scale, causal=causal, q_start=q_start, k_start=k_start)
    assert_close((out.cpu(), lse.cpu()), ref, tol=2e-2)
