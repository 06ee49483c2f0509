"""Consistent hashing of block keys over Redis nodes.

Each node owns many points on a 64-bit ring; a key belongs to the node of the first point at or
after the key's hash. Adding or removing one node moves only about 1/N of the keys, and the
virtual points spread keys evenly even for a handful of nodes.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

VIRTUAL_POINTS_PER_NODE = 160
_POINT_BYTES = 8


def _point(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=_POINT_BYTES).digest(), "big")


class HashRing:
    def __init__(self, nodes: Sequence[str], points_per_node: int = VIRTUAL_POINTS_PER_NODE):
        if not nodes:
            raise ValueError("a hash ring needs at least one node")
        self.nodes = list(nodes)
        # Points are named after the node (its URL), not its position: reordering the list moves nothing.
        ring = sorted(
            (_point(f"{node}#{i}"), index) for index, node in enumerate(self.nodes) for i in range(points_per_node)
        )
        self._points = [p for p, _ in ring]
        self._owners = [owner for _, owner in ring]

    def node_for(self, key: str) -> int:
        """Index (into `nodes`) of the node that holds `key`."""
        if len(self.nodes) == 1:
            return 0
        at = bisect.bisect_left(self._points, _point(key)) % len(self._points)
        return self._owners[at]
