"""Whether loading a prompt's cached K/V from the KV store beats computing it (issue 10's cost
model): a hit must never make the time to first token worse than a miss.

Both sides are measured on this worker, as rates in tokens per second: loads from Redis per
quant mode (an int4 block is a quarter of the bytes of a bf16 one, and dequantizing costs
too), prefills over the tokens they computed. Each rate is a running average weighted towards
recent measurements. A load is chosen when its predicted time is below the predicted time of
computing the same tokens; with no measurement yet of either side the load is tried (and
measured), and a tier that lost is tried again every `probe_every`-th time, so a store that
became faster is noticed. The worker's own tiers (pool pages mapped, host memory copied back at PCIe speed)
are always taken: they cost a fraction of either.

Linear in tokens on both sides: a prefill's per-token cost grows with its length (attention),
so the rate measured over whole prompts undervalues what the first cached tokens cost to
compute, which leans towards loading; the comparison is between all or none of the cached
tokens, both from the front.
"""

from __future__ import annotations

from dataclasses import dataclass


class Rate:
    """A running rate (units per second), each new measurement weighted `weight`."""

    def __init__(self, weight: float):
        self.weight = weight
        self.per_s: float | None = None  # None: nothing measured yet

    def add(self, units: float, seconds: float) -> None:
        if units <= 0 or seconds <= 0:
            return
        rate = units / seconds
        self.per_s = rate if self.per_s is None else (1 - self.weight) * self.per_s + self.weight * rate


@dataclass(frozen=True)
class LoadDecision:
    load: bool
    probe: bool  # loaded although predicted slower: the rate is measured again
    load_s: float | None  # predicted seconds to load the tokens (None: no measurement yet)
    compute_s: float | None  # predicted seconds to compute them

    @property
    def saved_s(self) -> float:
        """Predicted seconds the choice saves over the other one (0 when it cannot be told)."""
        if self.load_s is None or self.compute_s is None:
            return 0.0
        return abs(self.compute_s - self.load_s)


class PrefixCosts:
    def __init__(self, weight: float, probe_every: int):
        self.weight = weight
        self.probe_every = probe_every
        self.prefill = Rate(weight)  # computed tokens per second
        self._loads: dict[str, Rate] = {}  # quant mode -> loaded tokens per second
        self._skipped: dict[str, int] = {}  # quant mode -> loads skipped since the last one

    def load_rate(self, quant: str) -> Rate:
        return self._loads.setdefault(quant, Rate(self.weight))

    def decide(self, tokens: int, quant: str) -> LoadDecision:
        """Load `tokens` cached tokens stored under `quant`, or compute them?"""
        load, compute = self.load_rate(quant).per_s, self.prefill.per_s
        load_s = tokens / load if load else None
        compute_s = tokens / compute if compute else None
        if load_s is None or compute_s is None:
            return LoadDecision(True, False, load_s, compute_s)  # try it: the next decision is measured
        if load_s < compute_s:
            self._skipped[quant] = 0
            return LoadDecision(True, False, load_s, compute_s)
        self._skipped[quant] = self._skipped.get(quant, 0) + 1
        if self._skipped[quant] >= self.probe_every:
            self._skipped[quant] = 0
            return LoadDecision(True, True, load_s, compute_s)
        return LoadDecision(False, False, load_s, compute_s)
