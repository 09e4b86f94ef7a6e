"""Wall time never leaks into the virtual clock: a simulation on a host slowed down (a real sleep
in every step and every decode run, and a wall clock that runs a thousand times fast) gives
byte-identical results to the same seed on an idle host. SGLang's simulator shipped with exactly
this leak; a default ``clock=time.monotonic`` left somewhere in the engine would be one."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from pagedkv.scheduler import EngineConfig
from pagedkv.sim import CostModel, WorkloadConfig, simulate
from pagedkv.sim.executor import SimulatedExecutor, WallClock

PROFILE = CostModel(
    name="test", token_knots=[1, 2, 1026], token_costs_s=[0.024, 0.03, 1.054],
    per_decode_context_token_s=1e-6, per_prefill_attended_pair_s=1e-6,
    kv_bytes_per_token=1024, max_model_len=4096,
)
# a small pool, so that the run preempts and bulk decode runs alternate with single steps
ENGINE = EngineConfig(block_size=16, kv_cache_memory_bytes=2 * 2**20, max_model_len=2048, max_num_batched_tokens=256)
WORKLOAD = WorkloadConfig(num_requests=30, preset="sharegpt", arrival="poisson", rate=2.0, seed=5)


def run(policy: str) -> str:
    result, summary = simulate(WORKLOAD, ENGINE, policy, PROFILE)  # type: ignore[arg-type]
    return json.dumps({"summary": summary.model_dump(), "requests": [list(r) for r in result.records],
                       "steps": [list(s) for s in result.steps]})


def slowed(method: Callable[..., Any], calls: list[str]) -> Callable[..., Any]:
    def slow(*args: Any, **kwargs: Any) -> Any:
        calls.append(method.__name__)
        time.sleep(0.0002)  # a host busy with other work: each step takes real time
        return method(*args, **kwargs)
    return slow


@pytest.mark.parametrize("policy", ["paged", "reserve-max-len"])
def test_a_slow_host_and_a_fast_wall_clock_change_nothing(policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    idle = run(policy)
    if policy == "paged":
        assert json.loads(idle)["summary"]["preemptions"] > 0, "the pool should be small enough to preempt"
    real_monotonic, real_perf_counter, real_time = time.monotonic, time.perf_counter, time.time
    monkeypatch.setattr(time, "monotonic", lambda: 1000 * real_monotonic())
    monkeypatch.setattr(time, "perf_counter", lambda: 1000 * real_perf_counter())
    monkeypatch.setattr(time, "time", lambda: 1000 * real_time())
    calls: list[str] = []
    monkeypatch.setattr(SimulatedExecutor, "execute", slowed(SimulatedExecutor.execute, calls))
    monkeypatch.setattr(SimulatedExecutor, "execute_decodes", slowed(SimulatedExecutor.execute_decodes, calls))
    assert run(policy) == idle
    assert {"execute", "execute_decodes"} <= set(calls), "both single steps and bulk decode runs were slowed"


def test_a_real_run_s_clock_starts_at_its_first_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wall clock of a real run reads 0 when the run first asks, not when it was made: the
    engine is built (its runner warms up) in between, and requests arriving at 0 must not wait
    for that."""
    now = [100.0]
    monkeypatch.setattr("pagedkv.sim.executor.time.monotonic", lambda: now[0])
    clock = WallClock()
    now[0] += 5.0  # the engine builds and warms up
    assert clock() == 0.0
    now[0] += 0.25
    assert clock() == 0.25
