"""Collects the partial attention results of a decode step from every ring member and merges them.

Pure bookkeeping, no NATS: `FusionTable.add` takes one worker's batched message and returns the
replies that became complete. A merge group is (request_id, step, layer); a worker's message can
hold groups of several requests (batched decode) and is answered once all of them are merged.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field

from shared.attention.merge import merge_partials
from shared.messages import FusionReply, FusionRequest, MergedItem, PartialItem

GroupKey = tuple[str, int, int]  # (request_id, step, layer)


@dataclass
class _Group:
    parts: int
    created: float
    items: dict[int, PartialItem] = field(default_factory=dict)  # member -> partial
    merged: MergedItem | None = None
    delivered: int = 0


@dataclass
class _Waiter:
    token: Hashable  # where the reply goes (the NATS reply subject)
    keys: list[GroupKey]
    created: float


class FusionError(ValueError):
    pass


class FusionTable:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._groups: dict[GroupKey, _Group] = {}
        self._waiters: list[_Waiter] = []
        self.merges = 0

    def add(self, request: FusionRequest, token: Hashable, now: float | None = None) -> list[tuple[Hashable, FusionReply]]:
        now = time.monotonic() if now is None else now
        # Validate the whole message before touching the table: a bad message changes nothing.
        seen: set[tuple[GroupKey, int]] = set()
        for item in request.items:
            self._validate(item)
            key = (item.request_id, item.step, item.layer)
            group = self._groups.get(key)
            if group is not None and group.parts != item.parts:
                raise FusionError(f"{key}: members disagree on the number of parts")
            if (group is not None and (item.member in group.items or group.merged is not None)) or (key, item.member) in seen:
                raise FusionError(f"{key}: member {item.member} sent its partial twice")
            seen.add((key, item.member))
        keys: list[GroupKey] = []
        for item in request.items:
            key = (item.request_id, item.step, item.layer)
            group = self._groups.setdefault(key, _Group(parts=item.parts, created=now))
            group.items[item.member] = item
            keys.append(key)
            if len(group.items) == group.parts:
                self._merge(key, group)
        self._waiters.append(_Waiter(token, keys, now))
        return self._complete()

    def expire(self, now: float | None = None) -> list[tuple[Hashable, FusionReply]]:
        """Fail the waiters whose groups did not complete in time (a member died or was cancelled)."""
        now = time.monotonic() if now is None else now
        expired = [w for w in self._waiters if now - w.created > self.timeout_s]
        replies = []
        for waiter in expired:
            self._waiters.remove(waiter)
            missing = [k for k in waiter.keys if self._groups.get(k) is None or self._groups[k].merged is None]
            replies.append((waiter.token, FusionReply(items=[], error=f"fusion timed out waiting for {missing[:4]}")))
        live = {k for w in self._waiters for k in w.keys}
        for key in [k for k, g in self._groups.items() if k not in live and now - g.created > self.timeout_s]:
            del self._groups[key]
        return replies

    def drop_request(self, request_id: str) -> list[tuple[Hashable, FusionReply]]:
        """Forget a failed or cancelled request: its waiters are answered with an error now
        instead of at the timeout, so the surviving ring members are free at once."""
        replies = []
        still = []
        for waiter in self._waiters:
            if any(k[0] == request_id for k in waiter.keys):
                replies.append((waiter.token, FusionReply(items=[], error=f"request {request_id} was dropped")))
            else:
                still.append(waiter)
        self._waiters = still
        for key in [k for k in self._groups if k[0] == request_id]:
            del self._groups[key]
        return replies

    @property
    def pending_groups(self) -> int:
        return len(self._groups)

    def _validate(self, item: PartialItem) -> None:
        if not 0 <= item.member < item.parts:
            raise FusionError(f"member {item.member} outside 0..{item.parts - 1}")
        if item.out.dim() != 3 or item.lse.shape != item.out.shape[:2]:
            raise FusionError("partial shapes must be out [t, h, d] and lse [t, h]")

    def _merge(self, key: GroupKey, group: _Group) -> None:
        members = sorted(group.items)  # rank order: every reply is bit-identical
        shapes = {group.items[m].out.shape for m in members}
        if len(shapes) != 1:
            raise FusionError(f"{key}: partial shapes differ: {shapes}")
        out, lse = merge_partials([group.items[m].out for m in members], [group.items[m].lse for m in members])
        group.merged = MergedItem(request_id=key[0], step=key[1], layer=key[2], out=out, lse=lse)
        group.items.clear()
        self.merges += 1

    def _complete(self) -> list[tuple[Hashable, FusionReply]]:
        replies = []
        still = []
        for waiter in self._waiters:
            groups = [self._groups.get(k) for k in waiter.keys]
            if all(g is not None and g.merged is not None for g in groups):
                replies.append((waiter.token, FusionReply(items=[g.merged for g in groups])))
                for key, g in zip(waiter.keys, groups):
                    g.delivered += 1
                    if g.delivered == g.parts:
                        del self._groups[key]
            else:
                still.append(waiter)
        self._waiters = still
        return replies


class PartitionUsers:
    """Which workers still send partials to which fusion partition, from their heartbeats; a
    worker silent for `timeout_s` (gone) no longer counts. Lets a draining instance know when
    nobody needs it any more."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._seen: dict[str, tuple[float, frozenset[str]]] = {}  # worker -> (last beat, partitions)

    def on_heartbeat(self, worker_id: str, partitions: list[str], now: float | None = None) -> None:
        self._seen[worker_id] = (time.monotonic() if now is None else now, frozenset(partitions))

    def using(self, partition: str, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        return sorted(w for w, (seen, parts) in self._seen.items() if partition in parts and now - seen <= self.timeout_s)
