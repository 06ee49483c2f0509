"""shared/positions.py: runs of positions, and rows that follow them in order."""

import pytest
import torch

from shared.positions import clip_runs, positions_of, row_of, run_tokens, runs_of_rows


def test_runs_are_clipped_and_rows_found_in_run_order():
    runs = [(0, 6), (14, 20)]
    assert run_tokens(runs) == 12 and run_tokens([]) == 0
    assert clip_runs(runs, 0, 8) == [(0, 6)]
    assert clip_runs(runs, 4, 16) == [(4, 6), (14, 16)]
    assert clip_runs(runs, 6, 14) == []
    assert [row_of(runs, p) for p in (0, 5, 14, 19)] == [0, 5, 6, 11]
    with pytest.raises(ValueError):
        row_of(runs, 10)
    assert runs_of_rows(runs, 4, 9) == [(4, 6), (14, 17)]
    assert runs_of_rows(runs + [(30, 31)], 12, 13) == [(30, 31)]


def test_positions_of_runs_follow_them_in_order():
    assert positions_of([(5, 8), (1, 3)]).tolist() == [5, 6, 7, 1, 2]
    empty = positions_of([])
    assert empty.dtype == torch.long and empty.numel() == 0
    runs = [(3, 9), (20, 24)]
    rows = positions_of(runs)
    assert all(int(rows[row_of(runs, p)]) == p for p in [*range(3, 9), *range(20, 24)])
