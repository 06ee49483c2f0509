"""Chunked prefill of a request one worker holds alone (issue 13): its prompt goes through the
layers `step_tokens` positions at a time. Each chunk's queries attend over every row before
them and their own (causal, and the request's pattern), read back from the KV pool, so between
two chunks the worker's compute thread runs the decode steps of other requests: a long prompt no
longer freezes everyone else. The rows and the first token are a one-pass prefill's: the same
attention over the same keys, merged over other blocks.

A windowed layer reads only the rows its chunk's queries can see: the window, from the first
row inside the first query's window, and the sink or strided rows before it, as a second
partial merged in exactly. A request that frees behind its window (window_free.py) gives back
its pages behind the window after each chunk, and takes its pages chunk by chunk, so its prompt
needs about sinks + window + a chunk of KV, not the whole prompt.

A ring's members prefill in one pass (engine.prefill): they would have to advance the ring
exchange chunk by chunk together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.attention.local import attention_with_lse
from shared.attention.merge import merge_partials
from shared.attention.pattern import KeyPattern, layer_pattern
from shared.messages import PrefillCommand
from services.worker.kv_cache import RequestKV
from services.worker.window_free import free_behind_window


@dataclass
class PrefillChunks:
    """A single-worker prefill under way: positions [done, prompt_tokens) still to compute."""

    cmd: PrefillCommand
    kv: RequestKV  # rows [0, done) written (loaded prefix rows, then computed chunks)
    ids: torch.Tensor  # [prompt_tokens] int64, on the device
    done: int  # positions computed or loaded
    cached: int  # positions loaded from the prefix cache (not computed)
    pattern: KeyPattern | None  # the request's own attention pattern
    window: KeyPattern | None = None  # the window its pages are freed behind (None: all kept)
    last_hidden: torch.Tensor | None = None  # [1, hidden]: the last position's, once computed

    @property
    def total(self) -> int:
        return self.cmd.plan.prompt_tokens

    @property
    def finished(self) -> bool:
        return self.done >= self.total


def one_worker_positions(cmd: PrefillCommand) -> bool:
    """Whether this member holds the whole prompt, in order (a ring of one): chunkable."""
    segments = cmd.plan.segments[cmd.member]
    return cmd.plan.size == 1 and len(segments) == 1 and segments[0].start == 0 \
        and segments[0].end == cmd.plan.prompt_tokens


@torch.inference_mode()
def run_chunk(state: PrefillChunks, model, config, dtype: torch.dtype, tokens: int, finish_chunk_tokens: int) -> None:
    """Positions [done, done + tokens) through every layer; their K/V rows into the pool."""
    start, end = state.done, min(state.total, state.done + tokens)
    pool, kv = state.kv.pool, state.kv
    kv.reserve(end)  # a windowed request takes its pages chunk by chunk (the others hold them all already)
    positions = torch.arange(start, end, device=state.ids.device)
    h = model.embed(state.ids[start:end])  # [t, hidden]
    cos, sin = model.rope(positions, seq_len=state.total)
    for i, layer in enumerate(model.layers):
        q, k, v = layer.qkv(h, cos, sin)  # q [t, H, d], k/v [t, KVH, d]
        pool.write(i, kv.pages, start, k, v)
        del k, v
        out = _chunk_attention(q, kv, i, start, end, layer_pattern(state.pattern, config.window_of(i)),
                               model.attn_scale)
        del q
        for lo in range(0, h.shape[0], finish_chunk_tokens):  # the MLP's activations stay bounded
            hi = lo + finish_chunk_tokens
            h[lo:hi] = layer.finish(h[lo:hi], out[lo:hi].to(dtype))
        del out
    state.done = end
    free_behind_window(kv, state.window, end)  # the next chunk's queries start at `end`
    if state.finished:
        state.last_hidden = h[-1:]


def _chunk_attention(q: torch.Tensor, kv: RequestKV, layer: int, start: int, end: int,
                     pattern: KeyPattern | None, scale: float) -> torch.Tensor:
    """Queries at positions [start, end) (q [t, H, d]) over the rows they can see -> out [t, H, d]
    float32. Rows are positions here (one worker holds the whole prompt in order). A windowed
    layer reads the window's rows from the first query's window start and, as a second partial
    over a disjoint key set, the sink or strided rows before it: rows given back behind the
    window are never read."""
    if pattern is None or pattern.is_full:
        keys, values = kv.keys(layer, 0, end), kv.values(layer, 0, end)  # [end, KVH, d]
        out, _lse = attention_with_lse(q, keys, values, scale, causal=True, q_start=start, k_start=0)
        return out
    lo = max(0, start - pattern.window + 1)  # the first key any of these queries sees in its window
    out, lse = attention_with_lse(q, kv.keys(layer, lo, end), kv.values(layer, lo, end), scale, causal=True,
                                  q_start=start, k_start=lo, pattern=pattern)
    # before the window: the sinks, or every row for strided keys (the pattern masks the rest)
    extra_hi = lo if pattern.stride is not None else min(lo, pattern.sinks)
    if extra_hi == 0:
        return out
    extra_out, extra_lse = attention_with_lse(q, kv.keys(layer, 0, extra_hi), kv.values(layer, 0, extra_hi), scale,
                                              causal=True, q_start=start, k_start=0, pattern=pattern)
    out, _lse = merge_partials([out, extra_out], [lse, extra_lse])
    return out
