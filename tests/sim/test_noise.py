"""Step noise that wanders in time: draws keep the recorded residual distribution, draws close
in virtual time move together as much as the profile says, the fit recovers how much and how
fast from residual series, and a simulation with it spreads requests' pace as real runs do."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from pagedkv.scheduler import EngineConfig
from pagedkv.sim import CostModel, LengthDist, WorkloadConfig, simulate
from pagedkv.sim.noise import StepNoise, slow_noise

# Residual quantiles 0%, 1%, ..., 100% of a normal of sd 0.15 (its ends at 0.1% and 99.9%).
QUANTILES = [NormalDist(0.0, 0.15).inv_cdf(p) for p in np.clip(np.linspace(0, 1, 101), 0.001, 0.999)]


def scores(draws: np.ndarray) -> np.ndarray:
    return np.log(draws) / 0.15  # the quantiles are a normal of sd 0.15: log draws are its scores


def test_draws_keep_the_recorded_distribution_and_correlate_as_the_slow_share_says() -> None:
    noise = StepNoise(QUANTILES, seed=1, slow_share=0.6, corr_s=0.5)
    pairs = np.array([(noise(t), noise(t + 0.01)) for t in np.arange(0.0, 20_000.0, 10.0)])  # 10 s apart
    near, far = scores(pairs[:, 0]), scores(pairs[:, 1])
    assert np.corrcoef(near, far)[0, 1] == pytest.approx(0.6 * math.exp(-0.01 / 0.5), abs=0.05)
    assert np.corrcoef(near[1:], far[:-1])[0, 1] == pytest.approx(0.0, abs=0.05)  # 10 s: forgotten
    assert np.std(near) == pytest.approx(1.0, abs=0.05) and np.mean(near) == pytest.approx(0.0, abs=0.05)
    later = StepNoise(QUANTILES, seed=2, slow_share=0.6, corr_s=0.5)
    half_life = np.array([(later(t), later(t + 0.5)) for t in np.arange(0.0, 20_000.0, 10.0)])
    assert np.corrcoef(*scores(half_life).T)[0, 1] == pytest.approx(0.6 / math.e, abs=0.05)


def test_without_a_slow_share_the_draws_ignore_the_time() -> None:
    a, b = StepNoise(QUANTILES, seed=2), StepNoise(QUANTILES, seed=2)
    assert [a(0.0) for _ in range(100)] == [b(float(t)) for t in range(100)]


def test_the_fit_recovers_a_known_slow_share_and_correlation_time() -> None:
    rng = np.random.default_rng(3)
    share, corr_s, step = 0.6, 0.4, 0.02
    residuals, times, runs = [], [], []
    for run in range(12):  # runs of 10 s, a step every 20 ms
        t = np.arange(0.0, 10.0, step)
        keep = math.exp(-step / corr_s)
        slow = np.empty(len(t))
        slow[0] = rng.standard_normal()
        for i in range(1, len(t)):
            slow[i] = keep * slow[i - 1] + math.sqrt(1 - keep * keep) * rng.standard_normal()
        residuals.append(0.1 * (math.sqrt(share) * slow + math.sqrt(1 - share) * rng.standard_normal(len(t))))
        times.append(t)
        runs.append(np.full(len(t), run))
    fitted_share, fitted_corr = slow_noise(np.concatenate(residuals), np.concatenate(times), np.concatenate(runs))
    assert fitted_share == pytest.approx(share, abs=0.08)
    assert 0.7 * corr_s < fitted_corr < 1.4 * corr_s
    independent = rng.standard_normal(6000)
    assert slow_noise(independent, np.arange(6000) * step, np.zeros(6000))[0] < 0.05


def test_slow_noise_spreads_the_pace_of_requests_as_independent_noise_cannot() -> None:
    """The same per-step distribution: drawn independently, it averages out over a request's
    steps and every request decodes at nearly the same pace; wandering over seconds, requests
    that ran in a slow stretch are slower, so TPOT's p90 moves away from its p50."""
    profile = CostModel(name="test", token_knots=[1, 2, 1026], token_costs_s=[0.015, 0.016, 1.0],
                        per_decode_context_token_s=1e-6, per_prefill_attended_pair_s=1e-6,
                        kv_bytes_per_token=1024, max_model_len=4096, step_noise=QUANTILES)
    workload = WorkloadConfig(num_requests=200, arrival="poisson", rate=0.3, preset=None, max_model_len=512, seed=4,
                              prompt=LengthDist(kind="fixed", value=20), output=LengthDist(kind="fixed", value=60))
    engine = EngineConfig(block_size=16, num_blocks=256, max_model_len=512)

    def spread(slow_share: float) -> float:
        noisy = profile.model_copy(update={"noise_slow_share": slow_share, "noise_corr_s": 2.0})
        tpot = simulate(workload, engine, profile=noisy, noise_seed=5)[1].tpot_s
        return tpot.p90 / tpot.p50

    assert spread(0.7) > 1.1 > spread(0.0)  # 1.17 against 1.07 (seed 5)
