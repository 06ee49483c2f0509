"""setup_logging: JSON lines with service, level and timestamp from any thread or library, and the
trace ids of the current span even when nothing is recorded (no exporter: ALWAYS_OFF)."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import warnings

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from shared.logs import setup_logging


@pytest.fixture
def lines(monkeypatch):
    """setup_logging for this test only, onto a private stderr; returns a reader of its JSON lines."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, sys.excepthook, threading.excepthook)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    setup_logging("unit", "info")
    try:
        yield lambda: [json.loads(line) for line in err.getvalue().splitlines() if line.strip()]
    finally:
        handlers, level, hook, thread_hook = saved
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        sys.excepthook, threading.excepthook = hook, thread_hook
        logging.captureWarnings(False)
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


def test_unrecorded_span_still_gives_trace_ids(lines):
    tracer = TracerProvider(sampler=ALWAYS_OFF).get_tracer("t")
    log = structlog.get_logger("x")
    with tracer.start_as_current_span("s") as span:
        assert not span.is_recording()
        log.info("inside", request_id="r1")
    log.info("outside")
    inside, outside = lines()
    ctx = span.get_span_context()
    assert inside["trace_id"] == format(ctx.trace_id, "032x") and inside["span_id"] == format(ctx.span_id, "016x")
    assert {"event", "level", "service", "timestamp"} <= set(inside) and inside["service"] == "unit"
    assert "trace_id" not in outside


def test_other_threads_libraries_and_warnings_log_json_with_the_service(lines):
    t = threading.Thread(target=lambda: structlog.get_logger("x").info("from_thread"))
    t.start()
    t.join()
    logging.getLogger("somelib").warning("library says %s", "hi")
    logging.getLogger("somelib").debug("below the level")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("careful", UserWarning)
    records = lines()
    assert [r["level"] for r in records] == ["info", "warning", "warning"]
    assert all(r["service"] == "unit" and "timestamp" in r for r in records)
    assert records[0]["event"] == "from_thread"
    assert records[1]["event"] == "library says hi" and records[1]["logger"] == "somelib"
    assert "careful" in records[2]["event"]
