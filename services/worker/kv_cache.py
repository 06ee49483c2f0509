"""The KV cache a worker holds for its share of each request: per layer, growable K/V buffers.

Rows are in the order the worker received its tokens (its prompt segments, then the decode tokens
appended to it); decode attention needs no positions because a new token sees every cached key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GROWTH = 2  # capacity multiplies by this when full: amortised O(1) appends


class LayerKV:
    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, capacity: int):
        capacity = max(capacity, 1)
        self.k = torch.empty(capacity, kv_heads, head_dim, dtype=dtype, device=device)  # [cap, KVH, d]
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [t, KVH, d]"""
        need = self.length + k.shape[0]
        if need > self.k.shape[0]:
            cap = max(need, self.k.shape[0] * GROWTH)
            for name in ("k", "v"):
                old = getattr(self, name)
                new = torch.empty((cap, *old.shape[1:]), dtype=old.dtype, device=old.device)
                new[: self.length] = old[: self.length]
                setattr(self, name, new)
        self.k[self.length : need] = k
        self.v[self.length : need] = v
        self.length = need

    def keys(self) -> torch.Tensor:
        return self.k[: self.length]

    def values(self) -> torch.Tensor:
        return self.v[: self.length]

    @property
    def nbytes(self) -> int:
        return 2 * self.length * self.k[0].numel() * self.k.element_size()


@dataclass
class RequestKV:
    request_id: str
    member: int  # this worker's index in the request's ring
    layers: list[LayerKV]
    positions: list[tuple[int, int]] = field(default_factory=list)  # [start, end) runs held, in row order
    # attention mass each row received on sampled decode steps, summed over layers (H2O importance)
    mass: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def add_mass(self, mass: torch.Tensor) -> None:
        """mass: [rows] for the first rows (a prefix of the cache, which only grows)."""
        mass = mass.detach().float().cpu()
        if mass.shape[0] > self.mass.shape[0]:
            self.mass = torch.cat([self.mass, torch.zeros(mass.shape[0] - self.mass.shape[0])])
        self.mass[: mass.shape[0]] += mass

    @classmethod
    def empty(cls, request_id: str, member: int, num_layers: int, kv_heads: int, head_dim: int,
              dtype: torch.dtype, device: torch.device, capacity: int) -> "RequestKV":
        layers = [LayerKV(kv_heads, head_dim, dtype, device, capacity) for _ in range(num_layers)]
        return cls(request_id, member, layers)

    @property
    def tokens(self) -> int:
        return self.layers[0].length if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def runs_of_rows(self, first: int, end: int) -> list[tuple[int, int]]:
        """The positions of rows [first, end), as [start, end) runs."""
        return runs_of_rows(self.positions, first, end)

    def note_positions(self, start: int, end: int) -> None:
        if self.positions and self.positions[-1][1] == start:
            self.positions[-1] = (self.positions[-1][0], end)
        else:
            self.positions.append((start, end))


def runs_of_rows(runs: list[tuple[int, int]], first: int, end: int) -> list[tuple[int, int]]:
    """Rows follow `runs` in order; the positions of rows [first, end), as runs."""
    out, row = [], 0
    for s, e in runs:
        lo, hi = max(first, row), min(end, row + e - s)
        if lo < hi:
            out.append((s + lo - row, s + hi - row))
        row += e - s
    return out
