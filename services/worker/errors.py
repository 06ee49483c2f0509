"""The error code a failed step reaches the client with."""

from __future__ import annotations

import torch.distributed as dist

from shared.errors import BusError
from shared.messages import ErrorCode
from services.worker.kv_cache import KVPoolFull


def decode_error_code(exc: Exception) -> ErrorCode:
    """A full KV pool is `overloaded`; a fusion service or peer that cannot be reached (no
    responders, a timeout) `unavailable`, as for a lost worker; anything else `internal`."""
    if isinstance(exc, KVPoolFull):
        return ErrorCode.OVERLOADED
    if isinstance(exc, (BusError, TimeoutError, dist.DistBackendError)):
        return ErrorCode.UNAVAILABLE
    return ErrorCode.INTERNAL
