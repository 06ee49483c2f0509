"""structlog JSON logging: one JSON object per line on stderr, each with `event`, `level`,
`timestamp` and `service`, and, inside a span, `trace_id` / `span_id`.

Trace ids come from the current span's context, whether the span is recorded or not: with no
OTLP exporter the tracer samples nothing (ALWAYS_OFF, shared/telemetry.py) yet every span, local or
extracted from a message's headers, still has valid ids, so a request's events share one trace id
across services either way.

The service name is added by a processor rather than bound in a context variable, so events
logged from other threads (the worker's compute thread, exporter threads) carry it too. Records
of the standard `logging` module (libraries) and Python warnings are rendered as the same JSON.
"""

from __future__ import annotations

import logging
import sys
import threading

import structlog
from opentelemetry import trace


def _add_trace_ids(_logger, _name, event: dict) -> dict:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


def _service_adder(service: str):
    def add_service(_logger, _name, event: dict) -> dict:
        event.setdefault("service", service)
        return event

    return add_service


def _log_uncaught(service: str) -> None:
    """An exception nothing caught ends as a JSON event too, not a bare traceback."""
    log = structlog.get_logger(service)

    def excepthook(exc_type, exc, tb):
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        log.critical("uncaught_exception", exc_info=(exc_type, exc, tb))

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        log.error("thread_exception", thread=args.thread.name if args.thread else None,
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


def setup_logging(service: str, level: str = "info") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    shared = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _service_adder(service),
        _add_trace_ids,
    ]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Standard-library records (libraries, `warnings`) as the same JSON events.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.contextvars.merge_contextvars, structlog.stdlib.add_logger_name, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    ))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)
    _log_uncaught(service)
