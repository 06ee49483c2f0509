"""Rotary position embeddings, as pure functions mirroring Hugging Face's `modeling_rope_utils`.

A rope type is a way to compute the inverse frequencies `inv_freq: [head_dim // 2]` and an
`attention_factor` that multiplies cos and sin (so it scales q.k by its square; only yarn sets it).
The rotation pairs dimension i with i + head_dim/2 (Hugging Face's `rotate_half` convention, not
the interleaved one of the original Llama code).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from shared.model.config import RopeConfig

# yarn keeps the ramp's two ends apart by at least this much (transformers' guard against 0/0).
_YARN_MIN_RAMP_WIDTH = 0.001


def rope_inv_freq(
    rope: RopeConfig, head_dim: int, max_position_embeddings: int, seq_len: int | None = None
) -> tuple[Tensor, float]:
    """inv_freq [head_dim // 2] float32 on CPU (also inside a meta-device context), and attention_factor.

    seq_len (the whole sequence's length) only matters for `dynamic`, which stretches the base once
    the sequence outgrows max_position_embeddings; None means "not longer than that".
    """
    base_inv_freq = _default_inv_freq(rope.rope_theta, head_dim)
    if rope.rope_type == "default":
        return base_inv_freq, 1.0
    if rope.rope_type == "linear":
        return base_inv_freq / rope.factor, 1.0
    if rope.rope_type == "dynamic":
        return _dynamic_ntk_inv_freq(rope, head_dim, max_position_embeddings, seq_len), 1.0
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(rope, head_dim), _yarn_attention_factor(rope)
    if rope.rope_type == "llama3":
        return _llama3_inv_freq(rope, base_inv_freq), 1.0
    raise ValueError(f"unknown rope_type {rope.rope_type!r}")


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, attention_factor: float) -> tuple[Tensor, Tensor]:
    """positions: [tokens] int64 -> cos, sin: [tokens, head_dim] float32, on positions' device."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # [tokens, head_dim/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [tokens, head_dim]
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rotate_half(x: Tensor) -> Tensor:
    """[..., d] -> [..., d]: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [tokens, heads, head_dim], cos/sin: [tokens, head_dim] -> rotated x, in x's dtype."""
    cos = cos.to(x.dtype)[:, None, :]
    sin = sin.to(x.dtype)[:, None, :]
    return x * cos + rotate_half(x) * sin


def _default_inv_freq(theta: float, head_dim: int) -> Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim  # [head_dim/2]
    return 1.0 / (theta**exponents)


def _dynamic_ntk_inv_freq(rope: RopeConfig, head_dim: int, max_positions: int, seq_len: int | None) -> Tensor:
    seq_len = max(seq_len or 0, max_positions)
    stretch = (rope.factor * seq_len / max_positions) - (rope.factor - 1)
    base = rope.rope_theta * stretch ** (head_dim / (head_dim - 2))
    return _default_inv_freq(base, head_dim)


def _yarn_attention_factor(rope: RopeConfig) -> float:
    if rope.attention_factor is not None:
        return rope.attention_factor

    def mscale(scale: float, coefficient: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * coefficient * math.log(scale) + 1.0

    if rope.mscale and rope.mscale_all_dim:
        return mscale(rope.factor, rope.mscale) / mscale(rope.factor, rope.mscale_all_dim)
    return mscale(rope.factor)


def _yarn_inv_freq(rope: RopeConfig, head_dim: int) -> Tensor:
    """Interpolate low frequencies by `factor`, keep high ones, ramp linearly between (YaRN paper)."""
    base, original_max = rope.rope_theta, rope.original_max_position_embeddings

    def dim_of_rotations(num_rotations: float) -> float:
        # The dimension whose wavelength fits num_rotations times into the original context.
        return (head_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = dim_of_rotations(rope.beta_fast), dim_of_rotations(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += _YARN_MIN_RAMP_WIDTH

    pos_freqs = base ** (torch.arange(0, head_dim, 2, device="cpu").float() / head_dim)  # [head_dim/2]
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rope.factor * pos_freqs)
    dims = torch.arange(head_dim // 2, dtype=torch.float32, device="cpu")
    ramp = torch.clamp((dims - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


def _llama3_inv_freq(rope: RopeConfig, inv_freq: Tensor) -> Tensor:
    """Llama 3.1: divide long wavelengths by `factor`, keep short ones, smooth in between."""
    original_max = rope.original_max_position_embeddings
    low_freq_wavelen = original_max / rope.low_freq_factor
    high_freq_wavelen = original_max / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq

    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (original_max / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
