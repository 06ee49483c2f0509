"""Chunked prefill of a request one worker holds alone (issue 13): its prompt goes through the
layers `step_tokens` positions at a time. Each chunk's queries attend over every row before
them and their own (causal, and the request's pattern), read back from the KV pool, so between
two chunks the worker's compute thread runs the decode steps of other requests: a long prompt no
longer freezes everyone else. The rows and the first token are a one-pass prefill's: the same
attention over the same keys, merged over other blocks.

A ring's members prefill in one pass (engine.prefill): they would have to advance the ring
exchange chunk by chunk together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.attention.local import attention_with_lse
from shared.attention.pattern import KeyPattern, layer_pattern
from shared.messages import PrefillCommand
from services.worker.kv_cache import RequestKV


@dataclass
class PrefillChunks:
    """A single-worker prefill under way: positions [done, prompt_tokens) still to compute."""

    cmd: PrefillCommand
    kv: RequestKV  # rows [0, done) written (loaded prefix rows, then computed chunks)
    ids: torch.Tensor  # [prompt_tokens] int64, on the device
    done: int  # positions computed or loaded
    cached: int  # positions loaded from the prefix cache (not computed)
    pattern: KeyPattern | None  # the request's own attention pattern
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
    positions = torch.arange(start, end, device=state.ids.device)
    h = model.embed(state.ids[start:end])  # [t, hidden]
    cos, sin = model.rope(positions, seq_len=state.total)
    for i, layer in enumerate(model.layers):
        q, k, v = layer.qkv(h, cos, sin)  # q [t, H, d], k/v [t, KVH, d]
        pool.write(i, kv.pages, start, k, v)
        keys, values = kv.keys(i, 0, end), kv.values(i, 0, end)  # rows = positions [0, end)
        out, _lse = attention_with_lse(q, keys, values, model.attn_scale, causal=True, q_start=start, k_start=0,
                                       pattern=layer_pattern(state.pattern, config.window_of(i)))
        del q, k, v, keys, values
        for lo in range(0, h.shape[0], finish_chunk_tokens):  # the MLP's activations stay bounded
            hi = lo + finish_chunk_tokens
            h[lo:hi] = layer.finish(h[lo:hi], out[lo:hi].to(dtype))
        del out
    state.done = end
    if state.finished:
        state.last_hidden = h[-1:]
