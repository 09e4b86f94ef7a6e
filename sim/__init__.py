"""The workload simulator (the engine's scheduler and KV manager on a virtual clock) and
the ``pagedkv`` command line."""

from pagedkv.sim.api import SweepResult, run_real, simulate, sweep
from pagedkv.sim.cost_model import CostModel
from pagedkv.sim.metrics import SLO, Summary
from pagedkv.sim.workload import LengthDist, RequestSpec, WorkloadConfig, generate, load_trace, save_trace

__all__ = [
    "SLO",
    "CostModel",
    "LengthDist",
    "RequestSpec",
    "Summary",
    "SweepResult",
    "WorkloadConfig",
    "generate",
    "load_trace",
    "run_real",
    "save_trace",
    "simulate",
    "sweep",
]
