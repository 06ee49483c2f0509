"""The short text an error carries in replies and log events."""

from __future__ import annotations

# Cut to this: a 5 MB invalid body must not come back whole in its error reply.
MAX_ERROR_CHARS = 500


def error_text(exc: BaseException | str) -> str:
    """An exception (or message) as the short text replies and log events carry."""
    return str(exc)[:MAX_ERROR_CHARS]
