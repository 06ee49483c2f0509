"""Errors every layer shares: the bus's failures (raised by shared/bus.py, classified by code
where the bus itself is not imported) and the short text an error carries in replies and logs."""

from __future__ import annotations

# Cut to this: a 5 MB invalid body must not come back whole in its error reply.
MAX_ERROR_CHARS = 500


class BusError(RuntimeError):
    """A message could not be delivered or answered: no responder, a timeout."""


class PayloadTooLarge(BusError):
    """A message over the server's max_payload: no retry or other peer can carry it."""


def error_text(exc: BaseException | str) -> str:
    """An exception (or message) as the short text replies and log events carry."""
    return str(exc)[:MAX_ERROR_CHARS]
