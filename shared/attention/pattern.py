"""Which keys a query sees: the attention patterns of sliding, hybrid and strided attention, as
pure functions of global positions (no tensors of the model, no devices).

A query at position i sees a key at position j when j <= i (causal) and the pattern keeps it:
  * full (no window):            every causal key
  * window W (sliding):          i - W < j                     (transformers' sliding window)
  * sinks S (hybrid):            ... or j < S                  (attention sinks, StreamingLLM)
  * stride K (strided):          ... or j % K == 0             (every K-th key position)
Sinks and strides only ever add keys to a window: without a window the pattern is full.

A block of queries [q_lo, q_hi) against a block of keys [k_lo, k_hi) is, for a pattern:
  EMPTY  no query sees any key of the block (skipped: neither computed nor merged),
  WHOLE  every causal pair is kept (the causal fast paths run unchanged),
  CUT    some pairs are dropped: masked per (query, key).
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass

import torch


class BlockCover(enum.Enum):
    EMPTY = "empty"
    WHOLE = "whole"
    CUT = "cut"


@dataclass(frozen=True)
class KeyPattern:
    window: int | None = None  # W: keys after i - W; None: full attention (sinks, stride unused)
    sinks: int = 0  # S: keys at positions < S
    stride: int | None = None  # K: keys at positions that are multiples of K

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be positive, got {self.window}")
        if self.sinks < 0 or (self.stride is not None and self.stride < 1):
            raise ValueError(f"sinks must be >= 0 and stride positive, got {self.sinks}, {self.stride}")

    @property
    def is_full(self) -> bool:
        return self.window is None

    @property
    def has_extra_keys(self) -> bool:
        """Whether keys outside the window are kept (sinks or strided keys)."""
        return not self.is_full and (self.sinks > 0 or self.stride is not None)

    def hidden(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """q_pos [n], k_pos [tk] -> [n, tk] bool: the pairs the pattern drops (causality apart)."""
        if self.is_full:
            return torch.zeros(q_pos.shape[0], k_pos.shape[0], dtype=torch.bool, device=q_pos.device)
        hidden = k_pos[None, :] <= q_pos[:, None] - self.window
        kept = self.extra_key(k_pos)
        return hidden & ~kept[None, :] if kept is not None else hidden

    def extra_key(self, k_pos: torch.Tensor) -> torch.Tensor | None:
        """k_pos [tk] -> [tk] bool: keys kept whatever the query (sinks, strided), None if none."""
        kept = None
        if self.sinks > 0:
            kept = k_pos < self.sinks
        if self.stride is not None:
            strided = k_pos % self.stride == 0
            kept = strided if kept is None else kept | strided
        return kept

    def cover(self, q_lo: int, q_hi: int, k_lo: int, k_hi: int) -> BlockCover:
        """How the pattern covers queries [q_lo, q_hi) against keys [k_lo, k_hi), both non-empty."""
        if self.is_full or k_lo > q_hi - 1 - self.window or k_hi <= self.sinks:
            return BlockCover.WHOLE  # every key inside the last query's window, or every key a sink
        if k_hi - 1 > q_lo - self.window:
            return BlockCover.CUT  # some pair is inside the window, some is not
        # Every key left every query's window: only sinks and strided keys remain.
        if k_lo < self.sinks or (self.stride is not None and _first_multiple(k_lo, self.stride) < k_hi):
            return BlockCover.CUT
        return BlockCover.EMPTY


def _first_multiple(at_least: int, stride: int) -> int:
    return -(-at_least // stride) * stride


def extra_key_positions(pattern: KeyPattern, before: int) -> list[tuple[int, int, int]]:
    """The kept positions j < `before` outside any window, as (start, end, step) ranges:
    sinks [0, S) then the strided positions from S on (disjoint, ascending)."""
    if before <= 0 or not pattern.has_extra_keys:
        return []
    ranges = []
    sinks_end = min(pattern.sinks, before)
    if sinks_end > 0:
        ranges.append((0, sinks_end, 1))
    if pattern.stride is not None:
        first = _first_multiple(sinks_end, pattern.stride)
        if first < before:
            ranges.append((first, before, pattern.stride))
    return ranges


def tile_keys(pattern: KeyPattern, q_lo: int, q_hi: int, k_lo: int, k_hi: int
              ) -> tuple[tuple[int, int], list[tuple[int, int, int]]]:
    """The keys of a block [k_lo, k_hi) that a tile of queries [q_lo, q_hi) can see, for a windowed
    pattern -> (window span, extra ranges):
      * the window span [q_lo - W + 1, q_hi) inside the block (empty: lo == hi), where the window
        and causality cut pairs, so it is masked per (query, key);
      * before that span, the sink and strided positions as disjoint ascending (start, end, step)
        ranges inside the block. Each is <= q_lo - W, so it left every window of the tile, and it is
        causal for all its queries: every query of the tile sees every one of them, unmasked."""
    span_lo = min(max(k_lo, q_lo - pattern.window + 1), k_hi)
    span = (span_lo, max(span_lo, min(k_hi, q_hi)))
    extra = []
    for start, end, step in extra_key_positions(pattern, span_lo):
        first = max(start, k_lo) if step == 1 else _first_multiple(max(start, k_lo), step)
        if first < end:
            extra.append((first, end, step))
    return span, extra


def extra_key_rows(pattern: KeyPattern, runs: list[tuple[int, int]], query_position: int) -> list[int]:
    """Rows of a sequence held as position `runs` (rows in run order, ascending positions) that a
    query at `query_position` sees outside its window: the sink and strided keys. The window's own
    rows (positions > query_position - W) are not listed: they are a suffix of the rows."""
    if not pattern.has_extra_keys:
        return []
    before = query_position - pattern.window + 1  # positions < before left the window
    rows, row = [], 0
    for start, end in runs:
        for lo, hi, step in extra_key_positions(pattern, min(end, before)):
            first = max(lo, start) if step == 1 else max(lo, _first_multiple(start, step))
            rows.extend(range(row + first - start, row + hi - start, step))
        row += end - start
    return rows


def keys_seen(pattern: KeyPattern | None, positions: torch.Tensor) -> torch.Tensor:
    """positions [n] int64 (queries) -> [n] int64: how many causal keys (j <= i) each one sees."""
    causal = positions + 1
    if pattern is None or pattern.is_full:
        return causal
    seen = torch.clamp(causal, max=pattern.window)
    last_outside = positions - pattern.window  # the last position that left the window (< 0: none)
    outside = torch.clamp(last_outside + 1, min=0)  # how many positions left it
    sinks = torch.clamp(outside, max=pattern.sinks)
    seen = seen + sinks
    if pattern.stride is not None:
        # multiples of K in [sinks, last_outside]: floor division counts those <= x as x // K + 1
        strided = torch.div(last_outside, pattern.stride, rounding_mode="floor") - torch.div(
            sinks - 1, pattern.stride, rounding_mode="floor")
        seen = seen + torch.where(outside > 0, strided, torch.zeros_like(strided))
    return seen


def attention_sparsity(layer_patterns: list[KeyPattern | None], prompt_tokens: int, generated_tokens: int) -> float:
    """The fraction of the causal score matrix a request's patterns skipped, over its layers (each
    with its own pattern: None or full is causal), its prefill (queries at 0..prompt-1) and its
    decode (the generated tokens fed back: positions prompt..prompt+generated-2; the last token
    generated is never fed back). 0.0 for full attention; 0.0 when there were no queries."""
    queries = prompt_tokens + max(generated_tokens - 1, 0)
    if queries <= 0 or not layer_patterns:
        return 0.0
    positions = torch.arange(queries, dtype=torch.int64)
    causal = queries * (queries + 1) // 2
    layers_of = Counter(None if p is None or p.is_full else p for p in layer_patterns)  # each pattern once
    seen = sum(n * int(keys_seen(p, positions).sum()) for p, n in layers_of.items())
    return 1.0 - seen / (causal * len(layer_patterns))


def layer_pattern(request: KeyPattern | None, model_window: int | None) -> KeyPattern | None:
    """The pattern one layer runs: a request's own (not full) in every layer; else the model's:
    its sliding window in its sliding layers (`model_window`), full attention in the others."""
    if request is not None and not request.is_full:
        return request
    return KeyPattern(window=model_window) if model_window is not None else None
