"""KV quantization as in KIVI: keys per channel, values per token, asymmetric, in groups.

Keys have a few outlier channels with large magnitudes, so each channel gets its own range,
taken over a group of `group` consecutive tokens. Values have no such channels; each token gets
its own range over a group of `group` consecutive channels. Within a group:

    code = round((x - minimum) / scale),  scale = (maximum - minimum) / levels,  x' = code*scale + minimum

int8 keeps codes 0..255, int4 keeps 0..15 and packs two codes per byte. Scales and minimums are
stored as float16 beside the codes; they are rounded to float16 *before* the codes are computed,
so that rounding adds no error of its own. "none" keeps the tensors as they are.

Pure functions: no I/O, no global state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

QUANT_MODES = ("none", "int8", "int4")
LEVELS = {"int8": 255, "int4": 15}
SCALE_DTYPE = torch.float16
_SCALE_MAX = torch.finfo(SCALE_DTYPE).max
_NIBBLE_BITS = 4
_NIBBLE_MASK = 0x0F

# (name, shape, dtype) of each tensor of a QuantizedKV, in storage order
Layout = list[tuple[str, tuple[int, ...], torch.dtype]]


@dataclass
class QuantizedKV:
    """K and V of one block of one layer, ready to be stored. `parts` follows `kv_layout`."""

    mode: str
    dtype: torch.dtype  # of the original k and v
    shape: tuple[int, int, int]  # [tokens, kv_heads, head_dim] of k (and of v)
    group: int
    parts: dict[str, Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def compact(self) -> "QuantizedKV":
        """The same block owning exactly its bytes: parts that are views into a larger buffer (one
        copy of many layers' rows, often pinned) are copied out, so a cache that keeps this block
        keeps only what `nbytes` counts."""
        parts = {name: t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t
                 for name, t in self.parts.items()}
        return QuantizedKV(self.mode, self.dtype, self.shape, self.group, parts)


def kv_layout(mode: str, dtype: torch.dtype, shape: tuple[int, int, int], group: int) -> Layout:
    """The tensors a QuantizedKV of this mode holds; the block format checks lengths against it."""
    tokens, heads, dim = shape
    if mode == "none":
        return [("k", shape, dtype), ("v", shape, dtype)]
    if mode not in LEVELS:
        raise ValueError(f"unknown kv quant mode {mode!r}; expected one of {QUANT_MODES}")
    numel = tokens * heads * dim
    code_bytes = numel if mode == "int8" else math.ceil(numel / 2)
    key_groups = (math.ceil(tokens / group), heads, dim)  # one per channel per token group
    value_groups = (tokens, heads, math.ceil(dim / group))  # one per token per channel group
    return [
        ("k", (code_bytes,), torch.uint8),
        ("k_scale", key_groups, SCALE_DTYPE),
        ("k_min", key_groups, SCALE_DTYPE),
        ("v", (code_bytes,), torch.uint8),
        ("v_scale", value_groups, SCALE_DTYPE),
        ("v_min", value_groups, SCALE_DTYPE),
    ]


def bytes_per_token(
    mode: str, dtype: torch.dtype, kv_heads: int, head_dim: int, group: int, block_tokens: int
) -> float:
    """Stored bytes of K and V per token per layer, scales included, in blocks of `block_tokens`."""
    layout = kv_layout(mode, dtype, (block_tokens, kv_heads, head_dim), group)
    total = sum(math.prod(shape) * dt.itemsize for _, shape, dt in layout)
    return total / block_tokens


# ---- groups -----------------------------------------------------------------------------------


def _pad_to_multiple(x: Tensor, dim: int, multiple: int) -> Tensor:
    """Repeat the last slice along `dim` up to a multiple of `multiple`: the group ranges stay the same."""
    missing = -x.shape[dim] % multiple
    if missing == 0:
        return x
    last = x.narrow(dim, x.shape[dim] - 1, 1)
    return torch.cat([x, last.expand(*[missing if i == dim else s for i, s in enumerate(x.shape)])], dim=dim)


def _quantize_groups(x: Tensor, dim: int, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric quantization of float32 `x` with one range per slice along `dim` (kept as size 1)."""
    x = x.clamp(-_SCALE_MAX, _SCALE_MAX)
    minimum = x.amin(dim, keepdim=True).to(SCALE_DTYPE)
    scale = ((x.amax(dim, keepdim=True) - minimum.float()) / levels).to(SCALE_DTYPE)
    # A constant group (or one whose range underflows float16) codes everything as 0 = its minimum.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - minimum.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return codes, scale, minimum


def _pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes 0..15, any shape -> [ceil(n/2)] bytes, first code in the low nibble."""
    flat = codes.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << _NIBBLE_BITS)


def _unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    codes = torch.stack([packed & _NIBBLE_MASK, packed >> _NIBBLE_BITS], dim=-1)  # [n, 2]
    return codes.reshape(-1)[:numel]


def _store_codes(codes: Tensor, mode: str) -> Tensor:
    return codes.reshape(-1) if mode == "int8" else _pack_nibbles(codes)


def _load_codes(data: Tensor, mode: str, numel: int) -> Tensor:
    return data[:numel] if mode == "int8" else _unpack_nibbles(data, numel)


# ---- public -----------------------------------------------------------------------------------


def quantize_kv(k: Tensor, v: Tensor, mode: str, group: int) -> QuantizedKV:
    """k, v: [tokens, kv_heads, head_dim] (same shape, any float dtype, any device) -> QuantizedKV on the CPU."""
    if k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"k and v must both be [tokens, kv_heads, head_dim]; got {tuple(k.shape)}, {tuple(v.shape)}")
    if group < 1:
        raise ValueError("group must be at least 1")
    tokens, heads, dim = shape = tuple(k.shape)
    if mode == "none":
        # A copy, never a view: the caller's cache may be overwritten while this block is kept.
        parts = {"k": k.detach().to("cpu", copy=True).contiguous(), "v": v.detach().to("cpu", copy=True).contiguous()}
        return QuantizedKV(mode, k.dtype, shape, group, parts)
    # Quantized where the tensors are (a GPU does it in microseconds); only the compact result moves.
    k, v = k.detach(), v.detach()
    if mode not in LEVELS:
        raise ValueError(f"unknown kv quant mode {mode!r}; expected one of {QUANT_MODES}")
    levels = LEVELS[mode]

    # keys per channel: [groups, group, heads, dim], one range per (group, head, channel)
    k_grouped = _pad_to_multiple(k.float(), 0, group).view(-1, group, heads, dim)
    k_codes, k_scale, k_min = _quantize_groups(k_grouped, 1, levels)
    k_codes = k_codes.view(-1, heads, dim)[:tokens]
    # values per token: [tokens, heads, groups, group], one range per (token, head, channel group)
    v_grouped = _pad_to_multiple(v.float(), 2, group).view(tokens, heads, -1, group)
    v_codes, v_scale, v_min = _quantize_groups(v_grouped, 3, levels)
    v_codes = v_codes.view(tokens, heads, -1)[:, :, :dim]

    parts = {
        "k": _store_codes(k_codes, mode),
        "k_scale": k_scale.view(-1, heads, dim),
        "k_min": k_min.view(-1, heads, dim),
        "v": _store_codes(v_codes, mode),
        "v_scale": v_scale.view(tokens, heads, -1),
        "v_min": v_min.view(tokens, heads, -1),
    }
    return QuantizedKV(mode, k.dtype, shape, group, {n: t.contiguous().cpu() for n, t in parts.items()})


def dequantize_kv(
    q: QuantizedKV, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """QuantizedKV -> (k, v), each [tokens, kv_heads, head_dim] in `dtype` (default: the original) on `device`."""
    dtype = dtype or q.dtype
    tokens, heads, dim = q.shape
    if q.mode == "none":
        # Copies: the caller may write into its cache, which must not change the stored block.
        return q.parts["k"].to(device, dtype, copy=True), q.parts["v"].to(device, dtype, copy=True)
    group, numel = q.group, tokens * heads * dim
    p = {n: t.to(device) for n, t in q.parts.items()}

    k_codes = _load_codes(p["k"], q.mode, numel).view(tokens, heads, dim)
    k_codes = _pad_to_multiple(k_codes, 0, group).view(-1, group, heads, dim)
    k = k_codes.float() * p["k_scale"].float().unsqueeze(1) + p["k_min"].float().unsqueeze(1)
    k = k.view(-1, heads, dim)[:tokens]

    v_codes = _load_codes(p["v"], q.mode, numel).view(tokens, heads, dim)
    v_codes = _pad_to_multiple(v_codes, 2, group).view(tokens, heads, -1, group)
    v = v_codes.float() * p["v_scale"].float().unsqueeze(-1) + p["v_min"].float().unsqueeze(-1)
    v = v.view(tokens, heads, -1)[:, :, :dim]
    return k.to(dtype).contiguous(), v.to(dtype).contiguous()
