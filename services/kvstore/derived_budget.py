"""The KV budget when `kv_budget_bytes` is not set: derived from the memory of the Redis nodes.

Each node's *allowance* is `kv_budget_fraction` of its `maxmemory`, or, where maxmemory is 0
(unlimited), `kv_budget_host_fraction` of its host's memory as Redis reports it
(`total_system_memory`; in a container that is the host's, not the container's limit, so a
container with a memory limit should set maxmemory below it). Both come from `INFO memory`,
which works where `CONFIG GET` is renamed or refused (managed Redis).

**Several nodes.** The budget is one count over all nodes, while block bytes are spread over the
node URLs by consistent hashing, about evenly. So the node that fills first bounds the whole:
budget = min over servers of (allowance / its share of the URLs). With equal nodes that is their
sum; with unequal ones, the smallest times the number of nodes, so none is pushed past its own
allowance. Two URLs on one server (two databases) count as one server with twice the share. A
node that does not answer is assumed to be like those that do; with none answering the budget
stays what it was (FALLBACK_BUDGET_BYTES before the first answer), and the sweep asks again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis

from shared.kv.nodes import RedisNodes, server_address
from shared.settings import Settings

log = structlog.get_logger("kvstore")

# The budget before any Redis node has told its memory (and the default before budgets were
# derived); the sweep replaces it as soon as one answers.
FALLBACK_BUDGET_BYTES = 2 * 1024**3
# Where a budget came from, as `kv_budget_derived` and the kvstore's stats name it.
SOURCE_EXPLICIT = "explicit"  # RINGSERVE_KV_BUDGET_BYTES
SOURCE_MAXMEMORY = "maxmemory"
SOURCE_SYSTEM_MEMORY = "system_memory"
SOURCE_FALLBACK = "fallback"


@dataclass(frozen=True)
class NodeMemory:
    """What one node URL's server reports in `INFO memory`."""

    server: str  # host:port: URLs of one server share its memory
    maxmemory: int  # 0: unlimited
    total_system_memory: int


@dataclass(frozen=True)
class BudgetChoice:
    bytes: int
    source: str  # SOURCE_*; "maxmemory+system_memory" when nodes differ


def node_allowance(node: NodeMemory, fraction: float, host_fraction: float) -> tuple[int, str] | None:
    """(bytes of this server the KV store may use, which rule gave them); None when Redis told neither."""
    if node.maxmemory > 0:
        return int(node.maxmemory * fraction), SOURCE_MAXMEMORY
    if node.total_system_memory > 0:
        return int(node.total_system_memory * host_fraction), SOURCE_SYSTEM_MEMORY
    return None


def derive_budget(nodes: list[NodeMemory | None], fraction: float, host_fraction: float) -> BudgetChoice | None:
    """The budget over the node URLs in ring order (None: a node that did not answer), or None
    when no node told its memory. See the module's docstring for the rule."""
    urls_on = Counter(n.server for n in nodes if n is not None)
    per_url: list[int] = []
    sources: set[str] = set()
    for node in {n.server: n for n in nodes if n is not None}.values():
        allowance = node_allowance(node, fraction, host_fraction)
        if allowance is None:
            continue
        per_url.append(allowance[0] // urls_on[node.server])
        sources.add(allowance[1])
    if not per_url:
        return None
    return BudgetChoice(bytes=min(per_url) * len(nodes), source="+".join(sorted(sources)))


async def read_node_memory(nodes: RedisNodes) -> list[NodeMemory | None]:
    """`INFO memory` of every node URL (None where the node is unreachable)."""

    async def info(client: Redis) -> dict:
        return await client.info("memory")

    found: list[NodeMemory | None] = []
    for i, url in enumerate(nodes.urls):
        reply = await nodes.call(i, info, None)
        found.append(None if reply is None else NodeMemory(
            server=server_address(url), maxmemory=int(reply.get("maxmemory", 0)),
            total_system_memory=int(reply.get("total_system_memory", 0))))
    return found


class DerivedBudget:
    """The budget in force: the explicit setting, else the last one derived from the nodes."""

    def __init__(self) -> None:
        self.derived = BudgetChoice(FALLBACK_BUDGET_BYTES, SOURCE_FALLBACK)
        self._warned = False  # that no node answered: once, not on every sweep of an outage

    def current(self, settings: Settings) -> BudgetChoice:
        if settings.kv_budget_bytes is not None:
            return BudgetChoice(settings.kv_budget_bytes, SOURCE_EXPLICIT)
        return self.derived

    async def refresh(self, settings: Settings, nodes: RedisNodes) -> BudgetChoice:
        """Ask the nodes again (unless the budget is explicit); logged when it changes."""
        if settings.kv_budget_bytes is not None:
            return self.current(settings)
        memory = await read_node_memory(nodes)
        choice = derive_budget(memory, settings.kv_budget_fraction, settings.kv_budget_host_fraction)
        if choice is not None and choice != self.derived:
            self.derived = choice
            log.info("kv_budget_derived", budget=choice.bytes, source=choice.source,
                     nodes=len(memory), answered=sum(m is not None for m in memory))
        elif choice is None and self.derived.source == SOURCE_FALLBACK and not self._warned:
            self._warned = True
            log.warning("kv_budget_not_derived", budget=self.derived.bytes, reason="no Redis node answered")
        return self.derived
