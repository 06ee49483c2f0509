"""What a worker's heartbeat says about its prefix-cache tiers (`ringserve status` shows it): the
prompt blocks kept in its KV pool (the device tier) and in its host memory (the host tier)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the worker's engine modules pull in torch; this one is read by heartbeats only
    from services.worker.resident_prefix import ResidentPrefix


def tier_use(resident: ResidentPrefix | None) -> dict[str, int]:
    """The WorkerHeartbeat fields of the tiers; zeros where a tier is off."""
    if resident is None:
        return {}
    use = {"resident_pages": len(resident), "resident_bytes": len(resident) * resident.pool.page_bytes}
    host = resident.host
    if host is not None:
        use |= {"host_tier_bytes": host.bytes, "host_tier_limit_bytes": host.capacity_blocks * host.block_bytes}
    return use
