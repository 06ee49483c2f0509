"""Tiny Hugging Face checkpoints built with transformers itself, and a plain greedy decoder that drives
our model through its layer pieces (the way the worker does), for equivalence tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from shared.attention.pattern import KeyPattern
from shared.model import LlamaModel

# Weight scales of the random test models: large enough that logits differ clearly between tokens,
# so greedy decoding is varied and a wrong formula changes the tokens.
EMBED_STD = 0.1
NORM_JITTER = 0.1
BIAS_STD = 0.1
LM_HEAD_GAIN = 4.0


def tiny_dims(**overrides) -> dict:
    """Config kwargs of a tiny model: hidden 64, 2 layers, 4 heads, 2 kv heads, head_dim 16, vocab 300."""
    dims = dict(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return {**dims, **overrides}


def randomize_(model: PreTrainedModel, seed: int) -> None:
    """Re-draw every weight with scales that keep activations near unit size."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + NORM_JITTER * noise)
            elif name.endswith(".bias"):
                param.copy_(BIAS_STD * noise)
            elif "embed_tokens" in name:
                param.copy_(EMBED_STD * noise)
            else:
                gain = LM_HEAD_GAIN if name.startswith("lm_head") else 1.0
                param.copy_(noise * gain / param.shape[1] ** 0.5)


def save_tiny_checkpoint(config: PreTrainedConfig, directory: Path, seed: int = 0) -> PreTrainedModel:
    """Build a random transformers model for config, save it (safetensors) in directory, return it."""
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    model.save_pretrained(directory)
    return model.eval()


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, q_start: int,
                     pattern: KeyPattern | None = None) -> Tensor:
    """q: [tq, H, d] at positions q_start.., k/v: [tk, KVH, d] at positions 0.. -> out [tq, H, d] float32;
    with `pattern`, the dense causal mask and the pattern's (the reference the blocks must equal)."""
    groups = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, dim=1)
    v = v.float().repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale  # [H, tq, tk]
    q_pos = q_start + torch.arange(q.shape[0], device=q.device)
    k_pos = torch.arange(k.shape[0], device=q.device)
    hidden = k_pos[None, :] > q_pos[:, None]
    if pattern is not None:
        hidden |= pattern.hidden(q_pos, k_pos)
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def full_sequence_logits(model: LlamaModel, ids: list[int]) -> Tensor:
    """logits [t, vocab] of a whole sequence through model.forward with causal attention."""
    device = model.lm_head.weight.device
    positions = torch.arange(len(ids), device=device)

    def attend(_layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return causal_attention(q, k, v, model.attn_scale, q_start=0)

    with torch.inference_mode():
        return model(torch.tensor(ids, device=device), positions, attend)


def greedy_generate(model: LlamaModel, prompt: list[int], new_tokens: int,
                    pattern: KeyPattern | None = None) -> list[int]:
    """Greedy decoding with a local KV cache, driven through embed / rope / qkv / finish / logits,
    attention dense and masked (with `pattern`, in every layer).

    Stops after an end-of-sequence token, as transformers' `generate` does.
    """
    keys: list[list[Tensor]] = [[] for _ in model.layers]
    values: list[list[Tensor]] = [[] for _ in model.layers]
    device = model.lm_head.weight.device
    ids = torch.tensor(prompt, device=device)
    positions = torch.arange(len(prompt), device=device)
    generated: list[int] = []
    with torch.inference_mode():
        for _ in range(new_tokens):
            seq_len = int(positions[-1]) + 1
            cos, sin = model.rope(positions, seq_len)
            h = model.embed(ids)
            for i, layer in enumerate(model.layers):
                q, k, v = layer.qkv(h, cos, sin)
                keys[i].append(k)
                values[i].append(v)
                out = causal_attention(q, torch.cat(keys[i]), torch.cat(values[i]), model.attn_scale,
                                       q_start=int(positions[0]), pattern=pattern)
                h = layer.finish(h, out)
            next_id = int(model.logits(h[-1:])[0].argmax())
            generated.append(next_id)
            if next_id in model.config.eos_token_ids:
                break
            ids = torch.tensor([next_id], device=device)
            positions = torch.tensor([seq_len], device=device)
    return generated


def hf_greedy_generate(model: PreTrainedModel, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' own greedy `generate` (which stops after the config's eos token, if any)."""
    device = model.device
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt], device=device), max_new_tokens=new_tokens, do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
        )
    return out[0, len(prompt):].tolist()
