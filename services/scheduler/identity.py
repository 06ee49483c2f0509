"""Who sent a public request, as the NATS server says.

With the shipped NATS config every API tenant is an account of its own that imports the public
API from the services' account with `share: true`; the server then adds a `Nats-Request-Info`
header to each request naming the sender's account and user, and overwrites any such header a
client sets itself. Without accounts (a local `ringserve up`, the services' own user) there is
no header, no identity, and no tenant to keep apart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

REQUEST_INFO_HEADER = "Nats-Request-Info"


def requester_of(headers: Mapping[str, str] | None) -> str | None:
    """`account/user` of a request's sender, or None when the server named nobody."""
    raw = (headers or {}).get(REQUEST_INFO_HEADER)
    if not raw:
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(info, dict) or not isinstance(info.get("acc"), str):
        return None
    user = info.get("user")
    return f"{info['acc']}/{user}" if isinstance(user, str) else info["acc"]


def may_cancel(owner: str | None, canceller: str | None) -> bool:
    """A request is cancelled only by its own tenant; with no identity on the request, by anyone
    who can reach the cancel subject (a deployment without tenant accounts)."""
    return owner is None or owner == canceller
