"""Prediction intervals: a fit records its residuals, a simulation with noise draws each step's
time from them, and repeated simulations give intervals that cover what independent runs of a
system with that noise actually do."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pagedkv.errors import InvalidRequestError
from pagedkv.scheduler import EngineConfig
from pagedkv.sim import CostModel, LengthDist, WorkloadConfig, simulate, simulate_intervals
from pagedkv.sim.api import INTERVAL_METRICS
from pagedkv.sim.cost_model import hat_basis, power_of_two_knots
from pagedkv.sim.fit import Fit, fit
from pagedkv.sim.noise import StepNoise

BASE = CostModel(
    name="test", token_knots=[1, 2, 1026], token_costs_s=[0.024, 0.03, 1.054],
    per_decode_context_token_s=1e-6, per_prefill_attended_pair_s=1e-6,
    kv_bytes_per_token=1024, max_model_len=4096,
)
ENGINE = EngineConfig(block_size=16, kv_cache_memory_bytes=4 * 2**20, max_model_len=2048, max_num_batched_tokens=512)
WORKLOAD = WorkloadConfig(num_requests=80, preset="alpaca", rate=6.0, seed=100)


def lognormal_noise(sigma: float) -> list[float]:
    """Quantiles 0..100% of a normal log-residual with this sigma (ends at +-3 sigma)."""
    sample = np.random.default_rng(0).normal(0.0, sigma, 200_000)
    return [float(q) for q in np.quantile(np.clip(sample, -3 * sigma, 3 * sigma), np.linspace(0, 1, 101))]


def test_a_fit_records_the_residuals_it_leaves() -> None:
    """Steps 10% slower than the model half the time and 10% faster the other half: the
    recorded quantiles say so."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 100, 400)
    truth = 0.01 + 0.001 * tokens
    seconds = truth * np.where(rng.random(400) < 0.5, 1.1, 0.9)
    result = fit(np.column_stack([tokens, np.zeros((400, 4))]), seconds, power_of_two_knots(100))
    noise = np.exp(result.step_noise)
    assert noise[10] == pytest.approx(0.9, rel=0.03) and noise[90] == pytest.approx(1.1, rel=0.03)


def test_a_fit_with_parts_splits_the_run_speed_from_the_step_scatter() -> None:
    """Three parts timed at 0.9x, 1.0x and 1.15x the speed, each step scattered 5% (log-normal)
    about its part's: with the parts labelled, run_noise spans the parts' speeds and step_noise
    keeps only the scatter; unlabelled, the scatter absorbs the speeds and there is no run noise."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(1, 100, 900)
    parts = np.repeat([0, 1, 2], 300)
    speed = np.array([0.9, 1.0, 1.15])[parts]
    seconds = (0.01 + 0.001 * tokens) * speed * np.exp(rng.normal(0.0, 0.05, 900))
    features = np.column_stack([tokens, np.zeros((900, 4))])
    labelled = fit(features, seconds, power_of_two_knots(100), parts)
    assert labelled.run_noise[-1] - labelled.run_noise[0] == pytest.approx(math.log(1.15 / 0.9), rel=0.05)
    scatter = np.exp(labelled.step_noise)  # 10% and 90% of a 5% log-normal: exp(-+1.28 * 0.05)
    assert scatter[10] == pytest.approx(0.938, rel=0.015) and scatter[90] == pytest.approx(1.066, rel=0.015)
    pooled = fit(features, seconds, power_of_two_knots(100))
    assert pooled.run_noise == [] and pooled.step_noise[90] - pooled.step_noise[10] > 0.2


def test_with_parts_the_prices_are_the_median_part_s_not_the_mean() -> None:
    """Two parts at the usual speed and one a third slower (a busy minute): labelled, the fitted
    prices are the usual machine's, what the median real run does; pooled, the slow part pulls
    them about 10% up."""
    rng = np.random.default_rng(7)
    tokens = rng.integers(1, 100, 900)
    parts = np.repeat([0, 1, 2], 300)
    truth = 0.01 + 0.001 * tokens
    seconds = truth * np.array([1.0, 1.0, 1.33])[parts] * np.exp(rng.normal(0.0, 0.03, 900))
    features = np.column_stack([tokens, np.zeros((900, 4))])
    knots = power_of_two_knots(100)

    def priced(result: Fit) -> np.ndarray:
        model = BASE.model_copy(update={"token_knots": knots, "token_costs_s": result.token_costs_s})
        return np.array([model.tokens_time(int(t)) for t in tokens])

    assert np.median(priced(fit(features, seconds, knots, parts)) / truth) == pytest.approx(1.0, abs=0.015)
    assert np.median(priced(fit(features, seconds, knots)) / truth) > 1.07


def test_a_workload_timed_in_one_part_only_does_not_pass_for_the_machine_s_speed() -> None:
    """Two parts at the same speed, each with a stream workload; part 0 also timed a burst whose
    steps run 30% above what the curve fits (as calibration bursts run in one part each). With
    the workloads labelled, the parts' offsets come from the shared stream: no run noise; without,
    the burst passes for a slow part 0."""
    rng = np.random.default_rng(6)
    tokens = rng.integers(1, 100, 800)
    parts = np.repeat([0, 1], 400)
    workloads = np.where((parts == 0) & (np.arange(800) < 250), "burst", "stream")
    seconds = (0.01 + 0.001 * tokens) * np.where(workloads == "burst", 1.3, 1.0) * np.exp(rng.normal(0, 0.02, 800))
    features = np.column_stack([tokens, np.zeros((800, 4))])
    labelled = fit(features, seconds, power_of_two_knots(100), parts, workloads)
    assert abs(labelled.run_noise[-1] - labelled.run_noise[0]) < 0.01
    unlabelled = fit(features, seconds, power_of_two_knots(100), parts)
    assert unlabelled.run_noise[-1] - unlabelled.run_noise[0] > 0.1


def test_one_run_of_a_workload_in_a_slow_minute_does_not_price_its_batch_shapes() -> None:
    """Three parts, each timing a stream of small steps and a burst of big ones at the usual
    speed, except part 0's burst, which ran 25% slow while its stream did not: the run is a
    workload in a part, so that burst's offset is its own and the big steps are priced at the
    median burst's speed."""
    rng = np.random.default_rng(8)
    n = 1800
    parts = np.repeat([0, 1, 2], n // 3)
    burst = np.tile(np.arange(n // 3) < 200, 3)
    tokens = np.where(burst, rng.integers(33, 100, n), rng.integers(1, 32, n))
    truth = 0.01 + 0.001 * tokens
    seconds = truth * np.where(burst & (parts == 0), 1.25, 1.0) * np.exp(rng.normal(0.0, 0.02, n))
    knots = power_of_two_knots(100)
    result = fit(np.column_stack([tokens, np.zeros((n, 4))]), seconds, knots, parts, np.where(burst, "burst", "stream"))
    priced = hat_basis(tokens, knots) @ result.token_costs_s
    assert np.median(priced[burst] / truth[burst]) == pytest.approx(1.0, abs=0.015)
    assert max(result.run_noise) == pytest.approx(math.log(1.25), abs=0.02)


def test_a_run_s_speed_is_its_total_time_not_its_typical_step() -> None:
    """Three parts: one at the usual speed, one where a fifth of the steps ran 1.5x slow (10% more
    in total, its typical step as usual), one 20% slow throughout. By total time the median run is
    the one with slow stretches, and the prices add up to its total; by the median step it would
    pass for a usual run, and the prices would be 10% short of it."""
    rng = np.random.default_rng(9)
    n = 1500
    parts = np.repeat([0, 1, 2], n // 3)
    tokens = rng.integers(1, 100, n)
    truth = 0.01 + 0.001 * tokens
    stretches = (parts == 1) & (rng.random(n) < 0.2)
    seconds = truth * np.where(parts == 2, 1.2, 1.0) * np.where(stretches, 1.5, 1.0) * np.exp(rng.normal(0, 0.01, n))
    knots = power_of_two_knots(100)
    result = fit(np.column_stack([tokens, np.zeros((n, 4))]), seconds, knots, parts)
    priced = hat_basis(tokens, knots) @ result.token_costs_s
    assert priced[parts == 1].sum() == pytest.approx(seconds[parts == 1].sum(), rel=0.02)


def test_run_noise_slows_a_whole_run_by_one_factor() -> None:
    """No step scatter and one run-level speed (1.25x slower): every time stretched by 1.25."""
    burst = WorkloadConfig(num_requests=40, preset="alpaca", arrival="offline", seed=2)
    slow = BASE.model_copy(update={"step_noise": [0.0, 0.0], "run_noise": [math.log(1.25)] * 2})
    _, exact = simulate(burst, ENGINE, profile=BASE)
    _, noisy = simulate(burst, ENGINE, profile=slow, noise_seed=4)
    assert noisy.duration_s == pytest.approx(1.25 * exact.duration_s, rel=1e-9)
    assert noisy.tpot_s.p50 == pytest.approx(1.25 * exact.tpot_s.p50, rel=1e-9)


def test_intervals_cover_runs_whose_speed_moves_as_a_whole() -> None:
    """The 'real' system: each run at one speed drawn between 0.85x and 1.15x, each step
    scattered 10% about it, run 30 times. Predicted with the run-level noise, the 90% intervals
    hold the real median and most of the real runs; with the step scatter alone (what a fit
    without parts knows) they are too narrow and miss most of them: independent step noise
    averages out over a run's hundreds of steps."""
    speeds = [float(q) for q in np.linspace(math.log(0.85), math.log(1.15), 101)]
    real_system = BASE.model_copy(update={"step_noise": lognormal_noise(0.1), "run_noise": speeds})
    steps_only = real_system.model_copy(update={"run_noise": []})
    workload = WORKLOAD.model_copy(update={"arrival": "offline", "prompt": LengthDist(kind="fixed", value=48),
                                           "output": LengthDist(kind="fixed", value=24)})
    real = [simulate(workload, ENGINE, profile=real_system, noise_seed=1000 + i)[1] for i in range(30)]
    throughputs = [INTERVAL_METRICS["throughput (req/s)"](s) for s in real]
    intervals = {name: simulate_intervals(workload, ENGINE, runs=30, profile=profile,
                                          vary_workload=False).metrics["throughput (req/s)"]
                 for name, profile in (("run and step noise", real_system), ("step noise only", steps_only))}
    coverage = {name: sum(v in interval for v in throughputs) / len(throughputs)
                for name, interval in intervals.items()}
    assert float(np.median(throughputs)) in intervals["run and step noise"]
    assert coverage["run and step noise"] >= 0.75 and coverage["step noise only"] <= 0.4, coverage


def test_noise_multiplies_step_times_by_draws_from_the_quantiles() -> None:
    noise = StepNoise([0.0, math.log(2.0)], seed=3)
    draws = np.array([noise(0.0) for _ in range(20_000)])
    assert draws.min() >= 1.0 and draws.max() <= 2.0  # between exp of the two quantiles
    assert np.median(draws) == pytest.approx(math.sqrt(2.0), rel=0.02)  # uniform in log space


def test_constant_noise_slows_every_step_by_exactly_that() -> None:
    """All at once (offline) on a profile whose every step runs 25% slow: the same schedule,
    every time stretched by 1.25."""
    burst = WorkloadConfig(num_requests=40, preset="alpaca", arrival="offline", seed=2)
    slow = BASE.model_copy(update={"step_noise": [math.log(1.25)] * 2})
    _, exact = simulate(burst, ENGINE, profile=BASE)
    _, noisy = simulate(burst, ENGINE, profile=slow, noise_seed=7)
    assert noisy.duration_s == pytest.approx(1.25 * exact.duration_s, rel=1e-9)
    assert noisy.ttft_s.p90 == pytest.approx(1.25 * exact.ttft_s.p90, rel=1e-9)


def test_intervals_cover_independent_runs_of_a_system_with_known_noise() -> None:
    """The 'real' system here is the cost model with 30% log-normal step noise, run 40 times
    with other seeds; 20 simulations predict it. Each metric's 90% interval holds the real
    runs' median and most of the real runs (80-90% here; at least 60% for any metric and 75% on
    average, allowing for intervals estimated from 40 samples and judged on 40 more).
    Lengths are fixed and requests arrive at once, so that all of the spread is the steps'
    noise: intervals that left it out would have no width."""
    noisy = BASE.model_copy(update={"step_noise": lognormal_noise(0.3)})
    workload = WORKLOAD.model_copy(update={"arrival": "offline", "prompt": LengthDist(kind="fixed", value=48),
                                           "output": LengthDist(kind="fixed", value=24)})
    predicted = simulate_intervals(workload, ENGINE, runs=40, profile=noisy, level=0.9)
    real = [simulate(workload.model_copy(update={"seed": 1000 + i}), ENGINE, profile=noisy, noise_seed=1000 + i)[1]
            for i in range(40)]
    coverage = {}
    for name, metric in INTERVAL_METRICS.items():
        interval, values = predicted.metrics[name], [metric(s) for s in real]
        assert interval.low < interval.high, name
        assert float(np.median(values)) in interval, f"{name}: real median {np.median(values)} outside {interval}"
        coverage[name] = sum(v in interval for v in values) / len(values)
    assert min(coverage.values()) >= 0.6 and np.mean(list(coverage.values())) >= 0.75, coverage


def test_without_noise_the_runs_differ_only_by_their_workload_seed() -> None:
    result = simulate_intervals(WORKLOAD, ENGINE, runs=3, profile=BASE.model_copy(update={"step_noise": [0.0, 0.0]}))
    for i, summary in enumerate(result.runs):
        _, alone = simulate(WORKLOAD.model_copy(update={"seed": WORKLOAD.seed + i}), ENGINE, profile=BASE)
        assert summary.model_dump_json() == alone.model_dump_json()


def test_what_intervals_refuse() -> None:
    with pytest.raises(InvalidRequestError, match="records no step noise") as error:
        simulate_intervals(WORKLOAD, ENGINE, runs=2, profile=BASE)
    assert error.value.param == "noise_seed"
    with pytest.raises(InvalidRequestError, match="at least 2") as error:
        simulate_intervals(WORKLOAD, ENGINE, runs=1, profile=BASE)
    assert error.value.param == "runs"
    with pytest.raises(InvalidRequestError, match=r"level must be in \(0, 1\)") as error:
        simulate_intervals(WORKLOAD, ENGINE, runs=2, profile=BASE, level=1.0)
    assert error.value.param == "level"


def test_the_same_requests_every_run_when_the_workload_is_held() -> None:
    """vary_workload=False predicts a rerun of exactly these requests: with constant noise
    every run is the same, and the interval has no width."""
    constant = BASE.model_copy(update={"step_noise": [0.1, 0.1]})
    result = simulate_intervals(WORKLOAD, ENGINE, runs=3, profile=constant, vary_workload=False)
    assert len({s.model_dump_json() for s in result.runs}) == 1
    assert all(i.low == i.high for i in result.metrics.values())
