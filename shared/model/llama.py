"""A Llama-family decoder (Llama, Mistral, Qwen2) over flat tokens, with no batch dimension.

Attention itself is not here: the worker runs it (ring attention across processes for prefill,
sequence-parallel decode merged by the fusion service). A layer is therefore two pieces around it:

    q, k, v = layer.qkv(h, cos, sin)        # input norm, projections, rope
    h = layer.finish(h, attend(q, k, v))    # o_proj + residual, post-attention norm, MLP + residual

Shapes: h [tokens, hidden], q [tokens, heads, head_dim], k and v [tokens, kv_heads, head_dim].
Parameter names equal Hugging Face's state dict keys, so loading is a plain `load_state_dict`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.model.config import ModelConfig
from shared.model.rope import apply_rope, rope_cos_sin, rope_inv_freq

# attend(layer_idx, q, k, v) -> out [tokens, heads, head_dim]
AttendFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32, then scale in the model dtype: Hugging Face's exact order of roundings.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x * rsqrt(mean(x^2) + eps)
        return self.weight * normed.to(x.dtype)


class AttentionProjections(nn.Module):
    """The attention's weights only; the attention itself is the caller's `attend`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, config.num_key_value_heads * head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, config.num_key_value_heads * head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * head_dim, hidden, bias=config.o_proj_bias)


def fuse_linears(*linears: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """One weight (and bias) for several linears over the same input, their rows stacked; each
    linear's parameters become views of it, so the state dict and its memory stay as they were.
    A decode step runs one GEMM instead of several (fewer kernels: what a batch-1 step pays for)."""
    weight = torch.cat([m.weight for m in linears])
    bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[row : row + n], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[row : row + n], requires_grad=False)
        row += n
    return weight, bias


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.up_proj = nn.Linear(hidden, inner, bias=config.mlp_bias)
        self.down_proj = nn.Linear(inner, hidden, bias=config.mlp_bias)
        self._gate_up: tuple[Tensor, Tensor | None] | None = None  # fused weights, once fuse() ran

    def fuse(self) -> None:
        self._gate_up = fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x: Tensor) -> Tensor:
        if self._gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = F.linear(x, *self._gate_up).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.self_attn = AttentionProjections(config)
        self.mlp = SwiGLU(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._qkv: tuple[Tensor, Tensor | None] | None = None  # fused weights, once fuse() ran

    def fuse(self) -> None:
        """Stack q/k/v and gate/up into one weight each (after the weights are loaded)."""
        attn = self.self_attn
        self._qkv = fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj)
        self.mlp.fuse()

    def qkv(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h: [t, hidden], cos/sin: [t, head_dim] -> q [t, heads, hd], k and v [t, kv_heads, hd]."""
        x = self.input_layernorm(h)
        tokens, heads, kv_heads, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self._qkv is None:
            q = self.self_attn.q_proj(x).view(tokens, heads, hd)
            k = self.self_attn.k_proj(x).view(tokens, kv_heads, hd)
            v = self.self_attn.v_proj(x).view(tokens, kv_heads, hd)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v
        qkv = F.linear(x, *self._qkv).view(tokens, heads + 2 * kv_heads, hd)
        qk = apply_rope(qkv[:, : heads + kv_heads], cos, sin)  # one rope for q and k together
        return qk[:, :heads], qk[:, heads:], qkv[:, heads + kv_heads :]

    def finish(self, h: Tensor, attn_out: Tensor) -> Tensor:
        """h: [t, hidden] (this layer's input), attn_out: [t, heads, hd] (any float dtype) -> [t, hidden]."""
        attn_out = attn_out.to(h.dtype).reshape(h.shape[0], self.num_heads * self.head_dim)
        h = h + self.self_attn.o_proj(attn_out)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    """Hugging Face's inner `model.*`: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # None of the supported rope types changes the softmax scale (yarn scales cos/sin instead).
        self.attn_scale = config.head_dim**-0.5
        # Frequencies of rope types that do not depend on the sequence length, computed once.
        self._static_rope = (
            None
            if config.rope.rope_type == "dynamic"
            else rope_inv_freq(config.rope, config.head_dim, config.max_position_embeddings)
        )

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def fuse_projections(self) -> "LlamaModel":
        """q/k/v and gate/up as one GEMM each (the loader calls it once the weights are in, on their
        device: the fused weights are plain tensors, which `.to()` would not move)."""
        for layer in self.layers:
            layer.fuse()
        return self

    def embed(self, ids: Tensor) -> Tensor:
        """ids: [t] int64 -> h: [t, hidden]."""
        return self.model.embed_tokens(ids)

    def rope(self, positions: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
        """positions: [t] int64 -> cos, sin: [t, head_dim] float32.

        seq_len is the length of the whole sequence so far (prompt + generated), not of this chunk:
        dynamic NTK scaling depends on it.
        """
        if self._static_rope is not None:
            inv_freq, attention_factor = self._static_rope
            if inv_freq.device != positions.device:
                self._static_rope = inv_freq, attention_factor = inv_freq.to(positions.device), attention_factor
        else:
            inv_freq, attention_factor = rope_inv_freq(
                self.config.rope, self.config.head_dim, self.config.max_position_embeddings, seq_len
            )
        return rope_cos_sin(positions, inv_freq, attention_factor)

    @property
    def rope_is_static(self) -> bool:
        """Whether cos/sin depend on positions only (not on each sequence's length)."""
        return self._static_rope is not None

    def rope_static(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin of a static rope type, tensor ops only (a CUDA graph can hold them):
        positions [t] int64 -> [t, head_dim] float32."""
        inv_freq, attention_factor = self._static_rope
        if inv_freq.device != positions.device:
            self._static_rope = inv_freq, attention_factor = inv_freq.to(positions.device), attention_factor
        return rope_cos_sin(positions, inv_freq, attention_factor)

    def logits(self, h: Tensor) -> Tensor:
        """h: [t, hidden] -> logits: [t, vocab] float32."""
        return self.lm_head(self.model.norm(h)).float()

    def forward(self, ids: Tensor, positions: Tensor, attend: AttendFn, seq_len: int | None = None) -> Tensor:
        """ids, positions: [t] -> logits [t, vocab] float32, with attention done by `attend`.

        seq_len defaults to the last position + 1, which is right when this call holds the newest tokens.
        """
        if seq_len is None:
            seq_len = int(positions.max()) + 1
        cos, sin = self.rope(positions, seq_len)
        h = self.embed(ids)
        for layer_idx, layer in enumerate(self.layers):
            q, k, v = layer.qkv(h, cos, sin)
            h = layer.finish(h, attend(layer_idx, q, k, v))
        return self.logits(h)
