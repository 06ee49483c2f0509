"""What KV quantization costs a model: attention-output error and whether greedy tokens change.

The scenario is the store's: a prompt's full blocks come back from the KV store (quantized, block
by block, layer by layer), its tail that fills no block is computed fresh, then decoding goes on
greedily. Two measures, both against the same run with exact K/V:

  * attention error: for every layer, the exact run's queries (prompt tail + generated tokens)
    attend once over exact K/V and once over K/V whose stored part went through the quantizer;
    relative error ||out_q - out|| / ||out|| over all layers and queries;
  * greedy agreement: the generated tokens with a quantized cache vs with the exact one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from shared.attention.local import attention_plain
from shared.kv.quant import bytes_per_token, dequantize_kv, quantize_kv
from shared.model import LlamaModel

# Per layer: (k, v), each [tokens, kv_heads, head_dim].
Cache = list[tuple[Tensor, Tensor]]


@dataclass
class QuantReport:
    mode: str
    bytes_per_token: float  # K and V of one layer, scales included
    attention_rel_error: float
    greedy_tokens_equal: int  # generated tokens equal to the exact run's, before the first difference
    new_tokens: int


def roundtrip_blocks(k: Tensor, v: Tensor, mode: str, block_tokens: int, group: int) -> tuple[Tensor, Tensor]:
    """k, v: [t, KVH, d] -> the same with every full block quantized and restored (the tail stays exact)."""
    stored = (k.shape[0] // block_tokens) * block_tokens
    ks, vs = [], []
    for start in range(0, stored, block_tokens):
        end = start + block_tokens
        kb, vb = dequantize_kv(quantize_kv(k[start:end], v[start:end], mode, group))
        ks.append(kb)
        vs.append(vb)
    return torch.cat([*ks, k[stored:]]), torch.cat([*vs, v[stored:]])


def extend(model: LlamaModel, cache: Cache, ids: list[int], start: int, queries: list[Tensor] | None = None) -> Tensor:
    """Run `ids` at positions start.. over `cache` (appended in place) -> logits [len(ids), vocab].
    With `queries`, each layer's q [len(ids), H, d] is appended to queries[layer]."""
    device = model.lm_head.weight.device
    positions = torch.arange(start, start + len(ids), device=device)
    cos, sin = model.rope(positions, start + len(ids))
    h = model.embed(torch.tensor(ids, device=device))
    for i, layer in enumerate(model.layers):
        q, k, v = layer.qkv(h, cos, sin)
        if queries is not None:
            queries[i].append(q)
        k_all, v_all = torch.cat([cache[i][0], k]), torch.cat([cache[i][1], v])
        cache[i] = (k_all, v_all)
        out, _ = attention_plain(q, k_all, v_all, model.attn_scale, causal=True, q_start=start, k_start=0)
        h = layer.finish(h, out)
    return model.logits(h)


def greedy(model: LlamaModel, cache: Cache, tail: list[int], start: int, new_tokens: int,
           queries: list[list[Tensor]] | None = None) -> list[int]:
    """Prefill `tail` at position `start` over `cache`, then generate `new_tokens` greedily."""
    logits = extend(model, cache, tail, start, queries)
    tokens = [int(logits[-1].argmax())]
    position = start + len(tail)
    while len(tokens) < new_tokens:
        logits = extend(model, cache, tokens[-1:], position, queries)
        tokens.append(int(logits[-1].argmax()))
        position += 1
    return tokens


def empty_cache(model: LlamaModel) -> Cache:
    cfg, device = model.config, model.lm_head.weight.device
    empty = torch.empty(0, cfg.num_key_value_heads, cfg.head_dim, dtype=model.lm_head.weight.dtype, device=device)
    return [(empty, empty) for _ in model.layers]


@torch.inference_mode()
def evaluate_quantization(
    model: LlamaModel, prompt: list[int], modes: list[str], block_tokens: int, group: int, new_tokens: int,
    reference_dtype: torch.dtype = torch.bfloat16,
) -> list[QuantReport]:
    """Quantization reports for `modes` on `prompt`, whose full blocks play the cached prefix.
    Bytes of "none" are counted in `reference_dtype` (what a GPU worker stores)."""
    cached = (len(prompt) // block_tokens) * block_tokens
    if cached == 0 or cached == len(prompt):
        raise ValueError("the prompt needs at least one full block and a tail after its last full block")
    prefix, tail = prompt[:cached], prompt[cached:]

    prefix_cache = empty_cache(model)
    extend(model, prefix_cache, prefix, 0)
    exact_cache = list(prefix_cache)
    queries: list[list[Tensor]] = [[] for _ in model.layers]
    exact_tokens = greedy(model, exact_cache, tail, cached, new_tokens, queries)
    layer_queries = [torch.cat(q) for q in queries]

    cfg = model.config
    reports = []
    for mode in modes:
        restored = [roundtrip_blocks(k, v, mode, block_tokens, group) for k, v in prefix_cache]
        err_sq, ref_sq = 0.0, 0.0
        for i, q in enumerate(layer_queries):
            k_exact, v_exact = exact_cache[i]
            k_q = torch.cat([restored[i][0], k_exact[cached:]])
            v_q = torch.cat([restored[i][1], v_exact[cached:]])
            ref, _ = attention_plain(q, k_exact, v_exact, model.attn_scale, causal=True, q_start=cached)
            got, _ = attention_plain(q, k_q, v_q, model.attn_scale, causal=True, q_start=cached)
            err_sq += float((got - ref).pow(2).sum())
            ref_sq += float(ref.pow(2).sum())
        tokens = greedy(model, list(restored), tail, cached, new_tokens)
        equal = next((n for n, (a, b) in enumerate(zip(tokens, exact_tokens)) if a != b), new_tokens)
        reports.append(QuantReport(
            mode=mode,
            bytes_per_token=bytes_per_token(
                mode, reference_dtype, cfg.num_key_value_heads, cfg.head_dim, group, block_tokens
            ),
            attention_rel_error=math.sqrt(err_sq / ref_sq),
            greedy_tokens_equal=equal,
            new_tokens=new_tokens,
        ))
    return reports
