"""Position runs: half-open ranges [start, end) of token positions, the one way ringserve says
which positions something holds. A ring member's segments (shared/attention/layout.py), a
request's KV rows on a worker, a decode shard's rows and a member's cached prompt positions are
all lists of runs, and wherever rows are stored for runs they follow the runs in order.
(On the wire a run is `shared.messages.Segment`, a model with `start` and `end`.) Pure functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Run = tuple[int, int]  # [start, end) token positions


def run_tokens(runs: Sequence[Run]) -> int:
    """How many positions (rows) the runs hold."""
    return sum(end - start for start, end in runs)


def clip_runs(runs: Sequence[Run], start: int, end: int) -> list[Run]:
    """The parts of `runs` inside [start, end), in order."""
    return [(max(s, start), min(e, end)) for s, e in runs if max(s, start) < min(e, end)]


def row_of(runs: Sequence[Run], position: int) -> int:
    """The row holding `position` when rows follow `runs` in order."""
    row = 0
    for s, e in runs:
        if s <= position < e:
            return row + position - s
        row += e - s
    raise ValueError(f"position {position} not held")


def runs_of_rows(runs: Sequence[Run], first: int, end: int) -> list[Run]:
    """Rows follow `runs` in order; the positions of rows [first, end), as runs."""
    out, row = [], 0
    for s, e in runs:
        lo, hi = max(first, row), min(end, row + e - s)
        if lo < hi:
            out.append((s + lo - row, s + hi - row))
        row += e - s
    return out


def positions_of(runs: Sequence[Run], device: torch.device | str = "cpu") -> torch.Tensor:
    """The positions of the runs' rows, in order -> [tokens] int64."""
    if not runs:  # e.g. a ring member whose positions all came from the KV store
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(s, e, device=device) for s, e in runs])
