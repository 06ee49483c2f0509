"""How a worker's compute fails: the error code a failed step reaches the client with, and a
prefill that stopped because it was aborted."""

from __future__ import annotations

import torch.distributed as dist

from shared.errors import BusError, error_text
from shared.messages import DecodeResult, DecodeStep, ErrorCode
from services.worker.kv_cache import KVPoolFull


def decode_error_code(exc: Exception) -> ErrorCode:
    """A full KV pool is `overloaded`; a fusion service or peer that cannot be reached (no
    responders, a timeout) `unavailable`, as for a lost worker; anything else `internal`."""
    if isinstance(exc, KVPoolFull):
        return ErrorCode.OVERLOADED
    if isinstance(exc, (BusError, TimeoutError, dist.DistBackendError)):
        return ErrorCode.UNAVAILABLE
    return ErrorCode.INTERNAL


def failed(step: DecodeStep, member: int, exc: Exception) -> DecodeResult:
    return DecodeResult(request_id=step.request_id, member=member, step=step.step, ok=False,
                        error_code=decode_error_code(exc), error=error_text(exc))


class PrefillAborted(Exception):
    """A prefill stopped at a layer boundary because it was aborted; on a ring every member
    stops at the same `layer` (`layers` done), its partial K/V dropped."""

    def __init__(self, layer: int, layers: int, requested_here: bool):
        super().__init__(f"prefill cancelled before layer {layer} of {layers}")
        self.layer = layer
        self.layers = layers
        self.requested_here = requested_here  # this member saw the abort (else a peer did)
