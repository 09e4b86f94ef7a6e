"""The workload simulator: the engine's own scheduler and KV manager on a virtual clock,
priced by a cost model fitted to the real model (the ``pagedkv sim`` commands drive it)."""

from pagedkv.sim.api import (
    FleetSummary,
    Interval,
    IntervalSummary,
    SweepResult,
    capacity_search,
    run_real,
    simulate,
    simulate_fleet,
    simulate_intervals,
    sweep,
)
from pagedkv.sim.cost_model import CostModel
from pagedkv.sim.metrics import SLO, Summary
from pagedkv.sim.workload import LengthDist, RequestSpec, WorkloadConfig, generate, load_trace, save_trace

__all__ = [
    "SLO",
    "CostModel",
    "FleetSummary",
    "Interval",
    "IntervalSummary",
    "LengthDist",
    "RequestSpec",
    "Summary",
    "SweepResult",
    "capacity_search",
    "WorkloadConfig",
    "generate",
    "load_trace",
    "run_real",
    "save_trace",
    "simulate",
    "simulate_fleet",
    "simulate_intervals",
    "sweep",
]
