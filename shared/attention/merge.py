"""The one merge of partial attention results, used by ring prefill, decode and the fusion service.

A partial is the attention of some queries over a subset of the keys:
  out: [tokens, heads, dim]  softmax-weighted values, normalised over that subset only
  lse: [tokens, heads]       log-sum-exp of the scaled scores over that subset (-inf: empty subset)
Merging partials over disjoint key subsets gives the exact attention over their union:
  lse = logsumexp_i(lse_i),  out = sum_i exp(lse_i - lse) * out_i
Always computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_partials(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partials over disjoint key sets. outs[i]: [t, h, d], lses[i]: [t, h] -> (out, lse)."""
    if len(outs) != len(lses) or not outs:
        raise ValueError("merge_partials needs the same positive number of outputs and lses")
    lse_stack = torch.stack([l.float() for l in lses])  # [n, t, h]
    lse = torch.logsumexp(lse_stack, dim=0)  # [t, h]
    # Rows where every part is empty (-inf) have no keys at all: weight 0, lse stays -inf.
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lse_stack - safe_lse)  # [n, t, h]
    out = torch.zeros_like(outs[0], dtype=torch.float32)
    for w, o in zip(weights, outs):
        out += w.unsqueeze(-1) * o.float()
    return out, lse


def merge_into(
    acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one more partial into a running (float32) result; the ring's inner step."""
    return merge_partials((acc_out, out), (acc_lse, lse))
