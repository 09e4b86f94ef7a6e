"""The simulator's Python API: run a workload (simulated or for real) on one engine or a fleet
behind a router, or sweep request rates.

    from pagedkv import EngineConfig, WorkloadConfig, simulate
    result, summary = simulate(WorkloadConfig(preset="sharegpt", rate=0.5, num_requests=1000),
                               EngineConfig(kv_cache_memory_bytes="2GiB"))

An engine config without ``max_model_len`` serves the workload's (2048 by default), not
the profiled model's whole context: that is the longest request the workload can hold, and
what the command line does too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from pagedkv.errors import InvalidRequestError
from pagedkv.scheduler.config import EngineConfig
from pagedkv.sim.cost_model import DEFAULT_PROFILE, CostModel, Features
from pagedkv.sim.driver import RunResult, run_workload
from pagedkv.sim.executor import SimulatedExecutor, VirtualClock, WallClock
from pagedkv.sim.fleet import ROUTERS, FleetResult, Router, run_fleet
from pagedkv.sim.metrics import SLO, Summary, summarize
from pagedkv.sim.policies import Policy
from pagedkv.sim.report import Progress
from pagedkv.sim.search import Bound, SearchResult, SearchSpace, parse_slo, search
from pagedkv.sim.workload import WorkloadConfig, generate

if TYPE_CHECKING:
    from pagedkv.models.base import PagedLM

log = logging.getLogger(__name__)


def _progress(label: str, show: bool) -> Progress | None:
    return Progress(label) if show else None


def _cost(profile: CostModel | str | Path | None) -> CostModel:
    return profile if isinstance(profile, CostModel) else CostModel.load(profile or DEFAULT_PROFILE)


def _serving(engine: EngineConfig, workload: WorkloadConfig) -> EngineConfig:
    """``engine`` with the workload's context length where it gives none."""
    if engine.max_model_len is not None:
        return engine
    return engine.model_copy(update={"max_model_len": workload.max_model_len})


def simulate(
    workload: WorkloadConfig,
    engine: EngineConfig,
    policy: Policy = "paged",
    profile: CostModel | str | Path | None = None,
    slo: SLO | None = None,
    progress: bool = False,
    noise_seed: int | None = None,
) -> tuple[RunResult, Summary]:
    """Run ``workload`` through the real scheduler and KV manager on a virtual clock; with
    ``noise_seed``, each step's time varies as the profile's fit residuals did."""
    cost = _cost(profile)
    clock = VirtualClock()
    result = run_workload(
        generate(workload), _serving(engine, workload), SimulatedExecutor(cost, clock, noise_seed), clock, policy,
        concurrency=workload.concurrency if workload.closed_loop else None,
        progress=_progress(f"simulating {policy}", progress),
    )
    return _summarize_loudly(result, slo)


def _summarize_loudly(result: RunResult, slo: SLO | None) -> tuple[RunResult, Summary]:
    """The run's summary, with a warning when it completed nothing: its latencies are NaN, and a
    table of NaN says nothing about why (usually no request fits the pool or max_model_len)."""
    summary = summarize(result, slo)
    if summary.completed == 0:
        log.warning("policy %s completed no request (%d rejected as never fitting: a max_model_len or a "
                    "KV pool too small for the workload); its latencies are NaN", result.policy, summary.rejected)
    return result, summary


class Interval(BaseModel):
    """A metric over repeated runs: the median and the central ``level`` of the values."""

    model_config = ConfigDict(frozen=True)

    central: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float], level: float) -> Interval:
        finite = np.asarray([v for v in values if math.isfinite(v)])
        if len(finite) < len(values) or not len(finite):  # a run without the metric: no interval either
            return cls(central=math.nan, low=math.nan, high=math.nan)
        low, central, high = np.quantile(finite, [(1 - level) / 2, 0.5, (1 + level) / 2])
        return cls(central=float(central), low=float(low), high=float(high))

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high


INTERVAL_METRICS: dict[str, Callable[[Summary], float]] = {
    "throughput (req/s)": lambda s: s.requests_per_s,
    "output tokens/s": lambda s: s.output_tokens_per_s,
    "TTFT p50 (s)": lambda s: s.ttft_s.p50,
    "TTFT p90 (s)": lambda s: s.ttft_s.p90,
    "TPOT p50 (s)": lambda s: s.tpot_s.p50,
    "TPOT p90 (s)": lambda s: s.tpot_s.p90,
    "latency p50 (s)": lambda s: s.e2e_s.p50,
    "goodput (req/s in SLO)": lambda s: s.goodput_requests_per_s,
}


class IntervalSummary(BaseModel):
    """Repeated simulations of one workload and policy: every metric's median and interval."""

    model_config = ConfigDict(frozen=True)

    policy: str
    level: float
    metrics: dict[str, Interval]
    runs: list[Summary]


def simulate_intervals(
    workload: WorkloadConfig,
    engine: EngineConfig,
    runs: int = 20,
    policy: Policy = "paged",
    profile: CostModel | str | Path | None = None,
    slo: SLO | None = None,
    level: float = 0.9,
    progress: bool = False,
    vary_workload: bool = True,
) -> IntervalSummary:
    """``runs`` simulations of ``workload`` under ``policy``, run i with workload seed
    ``workload.seed + i`` (other arrivals and lengths from the same distributions; with
    ``vary_workload=False`` the same requests every time, to predict a rerun of exactly
    them) and step noise seed i (step times varying as the profile's fit residuals did),
    summarized as each metric's median and central ``level`` interval: a prediction of where
    a real run's value falls, given what the profile knows about its own errors."""
    if runs < 2:
        raise InvalidRequestError(f"runs must be at least 2 for an interval, got {runs}", "runs")
    if not 0 < level < 1:
        raise InvalidRequestError(f"level must be in (0, 1), got {level}", "level")
    cost = _cost(profile)
    summaries = []
    for i in tqdm(range(runs), desc=f"simulating {policy} x{runs}", unit="run", disable=not progress):
        seeded = workload.model_copy(update={"seed": workload.seed + i}) if vary_workload else workload
        summaries.append(simulate(seeded, engine, policy, cost, slo, noise_seed=i)[1])
    metrics = {name: Interval.of([metric(s) for s in summaries], level) for name, metric in INTERVAL_METRICS.items()}
    return IntervalSummary(policy=policy, level=level, metrics=metrics, runs=summaries)


class FleetSummary(BaseModel):
    """A fleet's metrics: all its requests as one run, and each replica's."""

    model_config = ConfigDict(frozen=True)

    router: str
    fleet: Summary
    replicas: list[Summary]
    routed: list[int]
    """Requests sent to each replica."""


def simulate_fleet(
    workload: WorkloadConfig,
    engine: EngineConfig,
    replicas: int,
    router: Router = "round-robin",
    policy: Policy = "paged",
    profile: CostModel | str | Path | None = None,
    slo: SLO | None = None,
    progress: bool = False,
) -> tuple[FleetResult, FleetSummary]:
    """Run ``workload`` on ``replicas`` simulated copies of ``engine`` behind ``router``
    (:mod:`pagedkv.sim.fleet`). Open-loop workloads only: a closed loop's clients would
    need a router of their own."""
    if workload.closed_loop:
        raise InvalidRequestError("a fleet takes open-loop arrivals (poisson, gamma, offline), not closed", "arrival")
    if replicas < 1:
        raise InvalidRequestError(f"replicas must be at least 1, got {replicas}", "replicas")
    if router not in ROUTERS:
        raise InvalidRequestError(f"router must be one of {', '.join(ROUTERS)}, got {router!r}", "router")
    cost = _cost(profile)
    label = f"simulating {replicas} x {policy} ({router})"
    result = run_fleet(generate(workload), _serving(engine, workload), cost, replicas, router, policy,
                       progress=_progress(label, progress))
    summaries = [_summarize_loudly(r, slo)[1] for r in result.replicas]
    fleet = summarize(result.merged(), slo)
    return result, FleetSummary(router=router, fleet=fleet, replicas=summaries, routed=result.routed)


def capacity_search(
    workload: WorkloadConfig,
    slo: str | list[Bound],
    space: SearchSpace | None = None,
    rate: float | None = None,
    router: Router = "least-outstanding",
    profile: CostModel | str | Path | None = None,
    precision: float = 0.1,
    progress: bool = False,
) -> SearchResult:
    """The configurations of ``space`` (defaults: :class:`SearchSpace`) that meet ``slo``
    (``"ttft_p90<2s,tpot_p50<100ms"``) on ``workload`` at ``rate``, cheapest first; without a
    rate, the highest rate each sustains (:mod:`pagedkv.sim.search`). Fleets of several
    replicas run behind ``router``."""
    if workload.closed_loop or workload.arrival == "offline":
        raise InvalidRequestError("a capacity search varies the request rate: use poisson or gamma arrivals",
                                  "arrival")
    bounds = parse_slo(slo) if isinstance(slo, str) else slo
    cost = _cost(profile)
    bar = tqdm(desc="searching", unit="sim", disable=not progress)

    def evaluate(engine: EngineConfig, replicas: int, at: float) -> Summary:
        bar.update()
        at_rate = workload.model_copy(update={"rate": at})
        if replicas == 1:
            return simulate(at_rate, engine, profile=cost)[1]
        return simulate_fleet(at_rate, engine, replicas, router, profile=cost)[1].fleet

    try:
        return search(space or SearchSpace(), bounds, evaluate, rate, precision=precision)
    finally:
        bar.close()


def run_real(
    workload: WorkloadConfig,
    engine: EngineConfig,
    model: str | PagedLM = "smollm2-135m",
    dtype: str = "float32",
    policy: Policy = "paged",
    slo: SLO | None = None,
    progress: bool = False,
    timings: list[tuple[Features, float]] | None = None,
) -> tuple[RunResult, Summary]:
    """The same workload on the real engine and model (a name, or one already loaded), on the
    wall clock. With ``timings``, every step's features and seconds are appended to it."""
    from pagedkv.loader import load_model
    from pagedkv.models.runner import ModelRunner
    from pagedkv.sim.calibrate import TimedExecutor

    loaded = load_model(model, dtype=dtype, device="cpu")[0] if isinstance(model, str) else model
    runner = ModelRunner(loaded)
    result = run_workload(
        generate(workload), _serving(engine, workload), runner if timings is None else TimedExecutor(runner, timings),
        WallClock(), policy,
        concurrency=workload.concurrency if workload.closed_loop else None,
        progress=_progress(f"running {model if isinstance(model, str) else type(model).__name__}", progress),
    )
    return _summarize_loudly(result, slo)


class SweepResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    rates: list[float]
    curves: dict[str, list[Summary]]
    latency_budget_s: float
    sustained_rate: dict[str, float]
    """Per policy, the highest swept rate up to which it sustains the load (0.0: not even the lowest)."""


def sustains(summary: Summary, latency_budget_s: float) -> bool:
    """Whether a run kept up: it completed requests, rejected none, and its p50 latency per output
    token is a number within the budget (NaN, from no completions, never is)."""
    p50 = summary.normalized_latency_s.p50
    return summary.completed > 0 and summary.rejected == 0 and math.isfinite(p50) and p50 <= latency_budget_s


def sweep(
    workload: WorkloadConfig,
    rates: Sequence[float],
    policies: Sequence[Policy],
    engine: EngineConfig,
    profile: CostModel | str | Path | None = None,
    latency_budget_s: float | None = None,
    slo: SLO | None = None,
    progress: bool = False,
) -> SweepResult:
    """Simulate every policy at every rate; a policy sustains the rates up to the first where it
    fails :func:`sustains`. Without a ``latency_budget_s``, the budget is three times the best p50
    latency per output token seen at the lowest rate (among policies that completed requests)."""
    rates = sorted(rates)
    curves: dict[str, list[Summary]] = {p: [] for p in policies}
    with tqdm(total=len(policies) * len(rates), desc="sweeping", unit="run", disable=not progress) as bar:
        for policy in policies:
            for rate in rates:
                _, summary = simulate(workload.model_copy(update={"rate": rate}), engine, policy, profile, slo)
                curves[policy].append(summary)
                bar.set_postfix_str(f"{policy} at {rate:g} req/s: p50 latency/token "
                                    f"{summary.normalized_latency_s.p50:.3f} s")
                bar.update()
    if latency_budget_s is None:
        lowest = [c[0].normalized_latency_s.p50 for c in curves.values() if c[0].completed > 0]
        latency_budget_s = 3 * min(lowest) if lowest else 0.0
    sustained: dict[str, float] = {}
    for name, summaries in curves.items():
        sustained[name] = 0.0
        for rate, summary in zip(rates, summaries, strict=True):  # up to the first rate it fails
            if not sustains(summary, latency_budget_s):
                break
            sustained[name] = rate
    return SweepResult(rates=list(rates), curves=curves, latency_budget_s=latency_budget_s, sustained_rate=sustained)
