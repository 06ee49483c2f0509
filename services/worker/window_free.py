"""Giving back the pages behind a request's window as it advances (issue 12 item 4): after each
prefill (or prefill chunk) and each decode step's append. Which requests do, and the KV a
worker then needs for them, is shared/attention/kv_need.py's rule.
"""

from __future__ import annotations

import structlog

from shared.attention.kv_need import freeing_pattern
from shared.attention.pattern import KeyPattern
from shared.messages import PrefillCommand
from services.worker.kv_cache import SCRATCH_PAGE, RequestKV

log = structlog.get_logger("worker")


def request_patterns(config, cmd: PrefillCommand) -> tuple[KeyPattern | None, KeyPattern | None]:
    """(the request's own pattern (None: the model's attention), the window and sinks this member
    may free behind (None: it keeps every page)). A member with prompt blocks to store keeps them
    all (kv_need.py)."""
    pattern = cmd.attention.key_pattern() if cmd.attention is not None else None
    layer_windows = [config.window_of(i) for i in range(config.num_hidden_layers)]
    return pattern, freeing_pattern(pattern, layer_windows, stores_blocks=bool(cmd.kv_blocks))


def free_behind_window(kv: RequestKV, window: KeyPattern | None, next_position: int) -> int:
    """Every position below `next_position` is written (or was never this member's): the queries
    to come, at `next_position` or later, see keys j > next_position - W and the sinks j < S.
    Give back the pages wholly before that (sink pages kept); -> pages given back now."""
    if window is None:
        return 0
    first_needed = kv.rows_through(next_position - window.window)  # rows of positions that left every window
    return kv.free_behind(first_needed, sink_rows=kv.rows_through(window.sinks - 1))


def after_prefill(kv: RequestKV, window: KeyPattern | None, prompt_tokens: int) -> None:
    """A prefill ended (the first decode query is at `prompt_tokens`): what no query to come sees
    goes back, and the log says how much of the prompt's KV went back during and after it."""
    free_behind_window(kv, window, prompt_tokens)
    log_window_freed(kv, window, "prefill")


def log_window_freed(kv: RequestKV, window: KeyPattern | None, phase: str) -> None:
    """`kv_window_freed`: pages given back behind the window so far (phase "prefill": by the
    prefill's end; "end": over the request's life here, decode included) and pages still held."""
    if window is None:
        return
    held = sum(1 for p in kv.pages if p != SCRATCH_PAGE)
    log.info("kv_window_freed", request_id=kv.request_id, member=kv.member, phase=phase, pages_freed=kv.freed_pages,
             pages_held=held, window=window.window, sinks=window.sinks)
