"""KV that fits (issue 12 item 4): which requests give back the pages behind their window, and
how much KV one worker then needs for them. The worker frees by this rule (window_free.py) and
the scheduler admits by it (admission.py), so both sides agree. Pure functions, no tensors.

A request frees behind its window when no key before the window, its sinks apart, is ever read
again, in any layer:
  * a per-request sliding or hybrid pattern (it applies in every layer), or
  * no pattern (or `full`) on a model whose every layer slides with one window (Mistral),
and its prompt blocks do not go to the prefix cache (a store reads the prompt's rows after the
prefill, and the resident tier keeps its pages after the request: those keep every page).
Strided patterns keep every page: their strided keys reach back to position 0. So do models
with some full-attention layers (Qwen2 with max_window_layers > 0), whose full layers read every row.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.attention.pattern import KeyPattern

# Partial pages at the two ends of the rows a windowed request holds (the window's first page
# and the page being written), each at most a page of rows that no query reads.
EDGE_PAGES = 2


def freeing_pattern(pattern: KeyPattern | None, layer_windows: Sequence[int | None],
                    stores_blocks: bool) -> KeyPattern | None:
    """The window (and sinks) a request's pages may be freed behind, or None: it keeps them all.

    pattern: the request's own (None or full: the model's attention); layer_windows: the model's
    window of each layer (None: a full layer); stores_blocks: its prompt blocks go to the prefix cache.
    (A request that frees keeps no decode shard copy in Redis either: the worker does not track it.)"""
    if stores_blocks:
        return None
    if pattern is not None and not pattern.is_full:
        return None if pattern.stride is not None else pattern
    windows = set(layer_windows)
    if len(windows) == 1 and None not in windows:
        return KeyPattern(window=windows.pop())
    return None


def windowed_kv_tokens(pattern: KeyPattern, step_tokens: int, page_tokens: int) -> int:
    """The most KV rows one worker holds for a request that frees behind its window and is
    prefilled there alone, whatever its length: the pages of its sinks, its window, the prompt
    chunk being prefilled (PREFILL_STEP_TOKENS; a decode step adds one row), and a partial page
    at each end of the window."""
    sink_pages = -(-pattern.sinks // page_tokens)
    return sink_pages * page_tokens + pattern.window + step_tokens + EDGE_PAGES * page_tokens


def one_worker_kv_tokens(pattern: KeyPattern | None, layer_windows: Sequence[int | None], stores_blocks: bool,
                         total_tokens: int, step_tokens: int, page_tokens: int) -> int:
    """KV tokens one worker needs for a request of `total_tokens` (prompt + the decode reserve)
    held there alone: all of them, or for a request that frees behind its window, no more than
    windowed_kv_tokens."""
    window = freeing_pattern(pattern, layer_windows, stores_blocks)
    if window is None:
        return total_tokens
    return min(total_tokens, windowed_kv_tokens(window, step_tokens, page_tokens))
