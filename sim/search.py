"""Capacity search: over a declared space of engine configurations and replica counts, the
cheapest that meet a latency SLO at a request rate, or the highest rate each sustains.

A configuration *meets* an SLO at a rate when its simulated run completes every request
(none rejected) and every bound holds (``ttft_p90<2s`` and so on). Cost is the KV memory
of the whole fleet (memory per replica times replicas), then the replicas.

The search prunes with binary searches instead of simulating the whole grid, on two
monotone assumptions it states and does not check: more KV memory per replica never makes
a configuration worse at a given rate, and a configuration that meets the SLO at a rate
meets it at any lower one. At a given rate, each combination of the other dimensions
takes a binary search over the memory sizes (the cheapest size that meets the SLO, if
any); for the sustained rate, each configuration takes a binary search over the rate
(to a stated relative precision). Vidur-Search, the anchor, spends an hour of CPU on a
search; on the shipped profile this one takes seconds to minutes.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pagedkv.errors import InvalidRequestError
from pagedkv.scheduler.config import EngineConfig
from pagedkv.scheduler.validation import InputModel
from pagedkv.sim.metrics import Summary

_SERIES = {"ttft": "ttft_s", "tpot": "tpot_s", "e2e": "e2e_s", "queueing": "queueing_s"}
_METRICS = [f"{name}_{p}" for name in _SERIES for p in ("p50", "p90", "p99")]


def metric_value(summary: Summary, metric: str) -> float:
    """``ttft_p90`` -> ``summary.ttft_s.p90``."""
    name, _, percentile = metric.partition("_")
    return float(getattr(getattr(summary, _SERIES[name]), percentile))
_BOUND = re.compile(r"^\s*([a-z0-9]+_p\d\d)\s*<\s*([0-9.]+(?:e-?\d+)?)\s*(ms|s)?\s*$")


class Bound(BaseModel):
    model_config = ConfigDict(frozen=True)

    metric: str
    seconds: float

    def holds(self, summary: Summary) -> bool:
        value = metric_value(summary, self.metric)
        return math.isfinite(value) and value <= self.seconds


def parse_slo(text: str) -> list[Bound]:
    """``"ttft_p90<2s,tpot_p50<100ms"`` -> bounds; metrics ttft, tpot, e2e, queueing at p50,
    p90 or p99, in s (the default) or ms."""
    bounds = []
    for part in text.split(","):
        match = _BOUND.match(part)
        if match is None or match.group(1) not in _METRICS:
            raise InvalidRequestError(
                f"slo: cannot read {part.strip()!r}; write METRIC<VALUE[s|ms], METRIC one of {', '.join(_METRICS)}",
                "slo",
            )
        value = float(match.group(2)) / (1000 if match.group(3) == "ms" else 1)
        if value <= 0:
            raise InvalidRequestError(f"slo: the bound on {match.group(1)} must be positive", "slo")
        bounds.append(Bound(metric=match.group(1), seconds=value))
    return bounds


class SearchSpace(InputModel):
    """The values each dimension may take; every combination is a candidate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kv_cache_memory_bytes: list[int] = Field(default=[64 * 2**20, 128 * 2**20, 256 * 2**20, 512 * 2**20],
                                             min_length=1)
    block_size: list[int] = Field(default=[16], min_length=1)
    max_num_seqs: list[int] = Field(default=[32, 128], min_length=1)
    max_num_batched_tokens: list[int] = Field(default=[512, 1024], min_length=1)
    enable_chunked_prefill: list[bool] = Field(default=[True], min_length=1)
    preemption_mode: list[Literal["recompute", "swap"]] = Field(default=["recompute"], min_length=1)
    replicas: list[int] = Field(default=[1, 2], min_length=1)

    def others(self) -> list[dict]:
        """Every combination of the dimensions other than memory."""
        names = ("block_size", "max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill",
                 "preemption_mode", "replicas")
        grid = itertools.product(*(getattr(self, n) for n in names))
        return [dict(zip(names, values, strict=True)) for values in grid]


class Candidate(BaseModel):
    """One configuration the search simulated, and what it found."""

    model_config = ConfigDict(frozen=True)

    engine: EngineConfig
    replicas: int
    cost_bytes: int
    """KV memory of the whole fleet."""
    meets: bool
    rate: float
    """The rate it was judged at (the given one, or the highest it sustains)."""
    summary: Summary | None
    """Its run at ``rate`` (None: it sustains no rate in the searched range)."""


class SearchResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    slo: list[Bound]
    rate: float | None
    """The rate asked for; None: each configuration's highest sustained rate was searched."""
    candidates: list[Candidate]
    """What was simulated to decide, cheapest first."""
    simulations: int

    @property
    def frontier(self) -> list[Candidate]:
        """The configurations worth choosing: at a given rate, those that meet the SLO,
        cheapest first; for sustained rates, those no cheaper configuration sustains more than."""
        if self.rate is not None:
            return sorted((c for c in self.candidates if c.meets), key=lambda c: (c.cost_bytes, c.replicas))
        frontier: list[Candidate] = []
        for c in sorted((c for c in self.candidates if c.meets), key=lambda c: (c.cost_bytes, -c.rate, c.replicas)):
            if not frontier or (c.cost_bytes > frontier[-1].cost_bytes and c.rate > frontier[-1].rate):
                frontier.append(c)
        return frontier


Evaluate = Callable[[EngineConfig, int, float], Summary]
"""Simulate an engine config on so many replicas at a request rate."""


def meets(summary: Summary, bounds: list[Bound]) -> bool:
    """Every request completed (none rejected) and every bound held."""
    return summary.completed > 0 and summary.rejected == 0 and all(b.holds(summary) for b in bounds)


def search(
    space: SearchSpace,
    bounds: list[Bound],
    evaluate: Evaluate,
    rate: float | None = None,
    rate_range: tuple[float, float] = (0.01, 100.0),
    precision: float = 0.1,
) -> SearchResult:
    """At ``rate``: per combination of the other dimensions, the cheapest memory size that
    meets ``bounds`` (a binary search over the sizes). Without: every configuration's highest
    sustained rate within ``rate_range``, to ``precision`` (a geometric binary search, which
    starts from the rate the next smaller memory size sustained)."""
    if rate is not None and rate <= 0:
        raise InvalidRequestError(f"rate must be positive, got {rate}", "rate")
    if not 0 < rate_range[0] < rate_range[1] or precision <= 0:
        raise InvalidRequestError("rate_range must be 0 < low < high and precision positive", "rate_range")
    memories = sorted(set(space.kv_cache_memory_bytes))
    runs: list[Candidate] = []

    def judge(memory: int, others: dict, replicas: int, at: float) -> bool:
        engine = EngineConfig(kv_cache_memory_bytes=memory, **others)
        summary = evaluate(engine, replicas, at)
        runs.append(Candidate(engine=engine, replicas=replicas, cost_bytes=memory * replicas,
                              meets=meets(summary, bounds), rate=at, summary=summary))
        return runs[-1].meets

    for others in space.others():
        replicas = others.pop("replicas")
        if rate is not None:
            first, last = 0, len(memories) - 1
            while first <= last:
                size = (first + last) // 2
                if judge(memories[size], others, replicas, rate):
                    last = size - 1
                else:
                    first = size + 1
            continue
        floor = rate_range[0]  # what the next smaller memory sustained: this one sustains at least that
        for memory in memories:
            if not judge(memory, others, replicas, floor):
                continue
            low, high = floor, rate_range[1]
            if judge(memory, others, replicas, high):
                low = high
            while high / low > 1 + precision:
                middle = math.sqrt(low * high)
                if judge(memory, others, replicas, middle):
                    low = middle
                else:
                    high = middle
            floor = low
    return SearchResult(slo=bounds, rate=rate, candidates=_verdicts(runs), simulations=len(runs))


def _verdicts(runs: list[Candidate]) -> list[Candidate]:
    """One entry per configuration simulated, cheapest first: its passing run at the highest
    rate, or its last failing run if none passed."""
    verdict: dict[tuple[str, int], Candidate] = {}
    for run in runs:
        key = (run.engine.model_dump_json(), run.replicas)
        kept = verdict.get(key)
        score = (run.meets, run.rate if run.meets else 0.0)
        if kept is None or score >= (kept.meets, kept.rate if kept.meets else 0.0):
            verdict[key] = run
    return sorted(verdict.values(), key=lambda c: (c.cost_bytes, c.replicas, -c.rate))
