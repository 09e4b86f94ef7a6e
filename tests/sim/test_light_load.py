"""Light load: steps taken soon after the engine idled run slower than the same steps in a run
that keeps the cores busy. The fit finds by how much from runs of both kinds, the simulator
charges it exactly within the window after an idle wait, and the calibration's timer counts
the engine's bookkeeping between steps in the step after it, never an idle wait."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pagedkv.scheduler import EngineConfig
from pagedkv.scheduler.executor import StepResult
from pagedkv.scheduler.plan import SchedulerOutput
from pagedkv.sim import CostModel, LengthDist, WorkloadConfig, simulate
from pagedkv.sim.calibrate import TimedExecutor, as_arrays
from pagedkv.sim.cost_model import hat_basis, power_of_two_knots
from pagedkv.sim.fit import fit

BASE = CostModel(name="test", token_knots=[1, 2, 1026], token_costs_s=[0.02, 0.021, 1.05],
                 per_decode_context_token_s=1e-6, per_prefill_attended_pair_s=1e-6, kv_bytes_per_token=1024,
                 max_model_len=4096)
LIGHT = BASE.model_copy(update={"light_load_slowdown": 0.1, "light_load_window_s": 0.06})


def _calibration(slowdown: float, seed: int) -> tuple[np.ndarray, ...]:
    """Four parts, each a burst (never idle) and a stream (idles every 20 steps) of the same step
    shapes; each run at its own speed (the machine drifts), stream steps ``slowdown`` slower."""
    rng = np.random.default_rng(seed)
    features, seconds, parts, workloads = [], [], [], []
    for part, kind in itertools.product(range(4), ("burst", "stream")):
        n = 400
        tokens = rng.integers(1, 64, n)
        idle = np.where((np.arange(n) % 20 == 0) & (kind == "stream"), rng.uniform(0.05, 0.5, n), 0.0)
        truth = (0.015 + 0.0004 * tokens) * (1 + slowdown * (kind == "stream"))
        seconds.append(truth * np.exp(rng.normal(0.0, 0.03, n) + rng.normal(0.0, 0.03)))
        features.append(np.column_stack([tokens, np.zeros((n, 3)), idle]))
        parts.append(np.full(n, part))
        workloads.append(np.full(n, kind))
    return tuple(np.concatenate(a) for a in (features, seconds, parts, workloads))


@pytest.mark.parametrize("slowdown", [0.0, 0.06])
def test_the_fit_recovers_a_known_light_load_slowdown_and_the_heavy_load_prices(slowdown) -> None:
    features, seconds, parts, workloads = _calibration(slowdown, seed=5)
    knots = power_of_two_knots(64)
    result = fit(features, seconds, knots, parts, workloads)
    assert result.light_load_slowdown == pytest.approx(slowdown, abs=0.01)
    tokens = features[:, 0]
    curve = hat_basis(tokens, knots) @ result.token_costs_s
    assert np.median(curve / (0.015 + 0.0004 * tokens)) == pytest.approx(1.0, abs=0.015)


def test_the_simulator_charges_the_slowdown_only_within_the_window_after_an_idle_wait() -> None:
    """Two requests 100 s apart, each alone: the first starts the run (no wait before it), the
    second comes after an idle wait, and its steps that start within 60 ms of it cost 10% more,
    decode steps taken in bulk as well (tests/scheduler/test_decode_run.py holds the two paths to
    the bit with a window that ends inside runs of decode steps)."""
    workload = WorkloadConfig(num_requests=2, arrival="poisson", rate=0.01, preset=None, max_model_len=256, seed=2,
                              prompt=LengthDist(kind="fixed", value=10), output=LengthDist(kind="fixed", value=6))
    engine = EngineConfig(block_size=16, num_blocks=64, max_model_len=256)
    plain, _ = simulate(workload, engine, profile=BASE)
    light, _ = simulate(workload, engine, profile=LIGHT)
    ratio = np.array(light.steps.duration) / np.array(plain.steps.duration)
    ends = np.array(light.steps.end)
    starts = ends - np.array(light.steps.duration)
    second = light.records[1].arrival
    woken = (starts >= second) & (starts < second + 0.06)
    assert woken.sum() == 3 and (starts[:6] < second).all()  # at 0, 32 (the prefill) and 54 ms
    assert ratio[woken] == pytest.approx(1.1) and ratio[~woken] == pytest.approx(1.0)


class _Runner:
    """Stands in for a model runner: each step takes 10 ms on the fake clock."""

    vocab_size, max_model_len, eos_token_id = 100, 64, None

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock

    def execute(self, plan: SchedulerOutput) -> StepResult:
        self.clock[0] += 0.010
        return StepResult([])


def test_the_timer_counts_bookkeeping_in_the_next_step_and_an_idle_wait_as_idle() -> None:
    now = [0.0]
    samples: list = []
    timed = TimedExecutor(_Runner(now), samples, clock=lambda: now[0])  # type: ignore[arg-type]
    for gap in (0.0, 0.001, 0.05, 0.002):  # before each step: none, bookkeeping, a wait, bookkeeping
        now[0] += gap
        timed.execute(SchedulerOutput([]))
    features, seconds = as_arrays(samples)
    assert features[:, 4] == pytest.approx([0.0, 0.0, 0.05, 0.0])
    assert seconds == pytest.approx([0.010, 0.011, 0.010, 0.012])


@pytest.mark.parametrize("field, value", [("light_load_slowdown", -0.01), ("light_load_window_s", 0.0)])
def test_a_profile_with_a_malformed_light_load_term_is_refused(field, value) -> None:
    with pytest.raises(ValueError, match=field):
        CostModel.model_validate({**BASE.model_dump(), field: value})
