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
from pagedkv.sim.driver import run_workload
from pagedkv.sim.executor import SimulatedExecutor, VirtualClock
from pagedkv.sim.fit import fit
from pagedkv.sim.workload import generate

BASE = CostModel(name="test", token_knots=[1, 2, 1026], token_costs_s=[0.02, 0.021, 1.05],
                 per_decode_context_token_s=1e-6, per_prefill_attended_pair_s=1e-6, kv_bytes_per_token=1024,
                 max_model_len=4096)
LIGHT = BASE.model_copy(update={"light_load_slowdown": 0.1, "light_load_window_s": 0.06})


def _calibration(slowdown: float, seed: int, window_s: float = 8.0, every: int = 20) -> tuple[np.ndarray, ...]:
    """Four parts, each a burst (never idle) and a stream (idles every ``every`` steps) of the same
    step shapes; each run at its own speed (the machine drifts), the stream's steps that start
    within ``window_s`` after a wait ``slowdown`` slower."""
    rng = np.random.default_rng(seed)
    features, seconds, parts, workloads = [], [], [], []
    for part, kind in itertools.product(range(4), ("burst", "stream")):
        n = 400
        tokens = rng.integers(1, 64, n)
        idle = np.where((np.arange(n) % every == 0) & (kind == "stream"), rng.uniform(0.05, 0.5, n), 0.0)
        steps = (0.015 + 0.0004 * tokens) * np.exp(rng.normal(0.0, 0.03, n) + rng.normal(0.0, 0.03))
        woke_at, now = -np.inf, 0.0
        for i in range(n):
            now += idle[i]
            woke_at = now if idle[i] else woke_at
            steps[i] *= 1 + slowdown * (now - woke_at < window_s)
            now += steps[i]
        seconds.append(steps)
        features.append(np.column_stack([tokens, np.zeros((n, 3)), idle]))
        parts.append(np.full(n, part))
        workloads.append(np.full(n, kind))
    return tuple(np.concatenate(a) for a in (features, seconds, parts, workloads))


@pytest.mark.parametrize("slowdown", [0.0, 0.06])
def test_the_fit_recovers_a_known_light_load_slowdown_and_the_heavy_load_prices(slowdown) -> None:
    features, seconds, parts, workloads = _calibration(slowdown, seed=5)
    knots = power_of_two_knots(64)
    result = fit(features, seconds, knots, parts, workloads)
    assert result.light_load_slowdown == pytest.approx(slowdown, abs=0.004)
    tokens = features[:, 0]
    curve = hat_basis(tokens, knots) @ result.token_costs_s
    assert np.median(curve / (0.015 + 0.0004 * tokens)) == pytest.approx(1.0, abs=0.015)


def test_the_fit_counts_only_the_steps_inside_the_window_as_light() -> None:
    """Waits every 60 steps (a second or more apart), the slowdown within 0.2 s after each: fitted
    with that window it is found; with a window that takes in every step of the stream, the
    steps that ran at full speed dilute it."""
    features, seconds, parts, workloads = _calibration(0.08, seed=6, window_s=0.2, every=60)
    knots = power_of_two_knots(64)
    assert fit(features, seconds, knots, parts, workloads, light_window_s=0.2).light_load_slowdown == pytest.approx(
        0.08, abs=0.01)
    assert fit(features, seconds, knots, parts, workloads, light_window_s=8.0).light_load_slowdown < 0.04


def test_a_run_that_is_all_light_load_fits_no_slowdown() -> None:
    """One Poisson run fitted on its own: every step is light, so a slowdown cannot be told from
    the prices, and the prices take the whole run's speed."""
    features, seconds, parts, workloads = _calibration(0.06, seed=7)
    stream = workloads == "stream"
    result = fit(features[stream], seconds[stream], power_of_two_knots(64), parts[stream], workloads[stream])
    assert result.light_load_slowdown == 0.0
    curve = hat_basis(features[stream, 0], power_of_two_knots(64)) @ result.token_costs_s
    assert np.median(curve / (0.015 + 0.0004 * features[stream, 0])) == pytest.approx(1.06, abs=0.015)


def test_the_simulator_charges_the_slowdown_only_within_the_window_after_an_idle_wait() -> None:
    """Two requests 100 s apart, each alone: the first starts the run (no wait before it), the
    second comes after an idle wait, and its steps that start within 60 ms of it cost 10% more,
    decode steps taken in bulk as well."""
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


def test_a_window_that_ends_inside_a_run_of_bulk_decode_steps_prices_them_as_one_by_one() -> None:
    """Requests 10-30 s apart, each decoding 60 tokens alone (a bulk run of 1.2 s): the 0.5 s
    window after each wait ends inside the run; bulk or step by step, the same run to the bit."""
    workload = WorkloadConfig(num_requests=6, arrival="poisson", rate=0.05, preset=None, max_model_len=256, seed=4,
                              prompt=LengthDist(kind="fixed", value=10), output=LengthDist(kind="fixed", value=60))
    engine = EngineConfig(block_size=16, num_blocks=64, max_model_len=256)
    profile = LIGHT.model_copy(update={"light_load_window_s": 0.5})
    crossed: list[bool] = []

    class Watching(SimulatedExecutor):
        def execute_decodes(self, num_seqs: int, context: int, max_steps: int, until: float) -> list[float]:
            start = self.clock.now
            ends = super().execute_decodes(num_seqs, context, max_steps, until)
            crossed.append(len(ends) > 1 and start < self._light_until < ends[-2])
            return ends

    runs = []
    for fast_forward in (False, True):
        clock = VirtualClock()
        executor = Watching(profile, clock)
        runs.append(run_workload(generate(workload), engine, executor, clock, fast_forward=fast_forward))
    assert runs[0] == runs[1] and sum(crossed) == 5  # the first request waited for no one
    # A decode step costs 20.0-20.1 ms, 22 ms in light load: after a 32 ms prefill, 22 of them
    # start inside the 0.5 s window.
    durations = np.array(runs[1].steps.duration)
    assert ((durations > 0.021) & (durations < 0.025)).sum() == 5 * 22
