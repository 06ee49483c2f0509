"""Optional API keys (RINGSERVE_API_KEYS, comma-separated): when any is set, /v1 requests need
`Authorization: Bearer <key>`."""

from __future__ import annotations

import hmac
from http import HTTPStatus

from services.gateway.errors import INVALID_API_KEY, GatewayError

BEARER_PREFIX = "bearer "


def parse_api_keys(setting: str | None) -> tuple[str, ...]:
    return tuple(key.strip() for key in (setting or "").split(",") if key.strip())


def check_authorization(header: str | None, keys: tuple[str, ...]) -> None:
    """Raises a 401 GatewayError unless no keys are configured or the header holds one of them."""
    if not keys:
        return
    if not header or not header.lower().startswith(BEARER_PREFIX):
        raise GatewayError(HTTPStatus.UNAUTHORIZED, "missing API key: send Authorization: Bearer <key>",
                           INVALID_API_KEY)
    presented = header[len(BEARER_PREFIX):].strip()
    # compare_digest: the time taken says nothing about how much of a key matched
    if not any(hmac.compare_digest(presented.encode(), key.encode()) for key in keys):
        raise GatewayError(HTTPStatus.UNAUTHORIZED, "invalid API key", INVALID_API_KEY)
