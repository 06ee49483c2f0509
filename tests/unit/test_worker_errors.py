"""What code a decode step's failure reaches the client with."""

from __future__ import annotations

import torch.distributed as dist

from shared.bus import BusError
from shared.messages import ErrorCode
from services.worker.kv_cache import KVPoolFull
from services.worker.errors import decode_error_code


def test_a_lost_fusion_service_or_peer_is_unavailable_a_full_pool_overloaded_the_rest_internal():
    assert decode_error_code(BusError("no responders on ringserve.internal.v1.fusion.f1.partials")) == ErrorCode.UNAVAILABLE
    assert decode_error_code(dist.DistBackendError("peer gone")) == ErrorCode.UNAVAILABLE
    assert decode_error_code(TimeoutError()) == ErrorCode.UNAVAILABLE
    assert decode_error_code(KVPoolFull("no page")) == ErrorCode.OVERLOADED
    assert decode_error_code(ValueError("bug")) == ErrorCode.INTERNAL
