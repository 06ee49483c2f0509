import torch

from shared.attention.merge import merge_into, merge_partials


def _attention(q, k, v, scale):
    """Reference in float64: q [t,h,d], k/v [n,h,d] -> out [t,h,d], lse [t,h]."""
    scores = torch.einsum("thd,nhd->thn", q.double(), k.double()) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("thn,nhd->thd", torch.softmax(scores, dim=-1), v.double())
    return out, lse


def test_merge_of_disjoint_key_sets_equals_full_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 8), torch.randn(20, 4, 8) * 3, torch.randn(20, 4, 8)
    full, full_lse = _attention(q, k, v, 0.35)
    cuts = [0, 7, 8, 20]
    parts = [_attention(q, k[a:b], v[a:b], 0.35) for a, b in zip(cuts, cuts[1:])]
    out, lse = merge_partials([p[0].float() for p in parts], [p[1].float() for p in parts])
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), full, rtol=1e-5, atol=1e-6)
    assert torch.allclose(lse.double(), full_lse, rtol=1e-5, atol=1e-5)
    # order does not matter
    out2, _ = merge_partials([p[0].float() for p in parts[::-1]], [p[1].float() for p in parts[::-1]])
    assert torch.allclose(out, out2, atol=1e-6)


def test_merge_into_folds_running_result_and_handles_empty_parts():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 2, 4), torch.randn(6, 2, 4), torch.randn(6, 2, 4)
    a, b = _attention(q, k[:2], v[:2], 0.5), _attention(q, k[2:], v[2:], 0.5)
    empty = (torch.zeros(2, 2, 4), torch.full((2, 2), float("-inf")))
    acc = merge_into(empty[0], empty[1], a[0].float(), a[1].float())
    acc = merge_into(acc[0], acc[1], b[0].float(), b[1].float())
    full, _ = _attention(q, k, v, 0.5)
    assert torch.allclose(acc[0].double(), full, atol=1e-6)
    # all parts empty: zero output, -inf lse, no NaN
    out, lse = merge_partials([empty[0], empty[0]], [empty[1], empty[1]])
    assert not torch.isnan(out).any() and torch.isinf(lse).all()
