"""The wake-up cost: the first step after the engine idled costs more, the fit finds how much
from the idle times the calibration records, and the simulator charges it exactly when its
clock jumped over an idle wait (and never between steps that follow each other)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pagedkv import LLMEngine, SamplingParams
from pagedkv.models import ModelRunner
from pagedkv.scheduler import EngineConfig
from pagedkv.sim import CostModel, LengthDist, WorkloadConfig, simulate
from pagedkv.sim.calibrate import TimedExecutor, as_arrays
from pagedkv.sim.cost_model import WAKE_KNOTS_S, hat_basis, power_of_two_knots, wake_basis
from pagedkv.sim.fit import fit
from pagedkv.sim.metrics import request_columns

BASE = CostModel(name="test", token_knots=[1, 2, 1026], token_costs_s=[0.02, 0.021, 1.05],
                 per_decode_context_token_s=1e-6, per_prefill_attended_pair_s=1e-6, kv_bytes_per_token=1024,
                 max_model_len=4096)
WOKEN = BASE.model_copy(update={"wake_knots_s": [0.003, 0.03, 0.3], "wake_costs_s": [0.0, 0.001, 0.003]})


def test_the_wake_up_cost_is_zero_below_the_first_knot_log_linear_between_flat_beyond() -> None:
    assert [WOKEN.wake_time(s) for s in (0.0, 0.001, 0.003)] == [0.0, 0.0, 0.0]
    assert WOKEN.wake_time(0.03) == pytest.approx(0.001)
    assert WOKEN.wake_time(0.03 * 10**0.5) == pytest.approx(0.002)  # halfway in log(idle)
    assert WOKEN.wake_time(0.3) == WOKEN.wake_time(30.0) == pytest.approx(0.003)
    assert BASE.wake_time(10.0) == 0.0  # a profile without the term
    basis = wake_basis(np.array([0.0, 0.03, 0.03 * 10**0.5, 5.0]), [0.003, 0.03, 0.3])
    assert basis @ [0.001, 0.003] == pytest.approx([0.0, 0.001, 0.002, 0.003])


@pytest.mark.parametrize("knots, costs", [([0.01], [0.0]), ([0.1, 0.01], [0.0, 0.001]), ([0.01, 0.1], [0.001, 0.002]),
                                          ([0.01, 0.1], [0.0])])
def test_a_profile_with_a_malformed_wake_up_cost_is_refused(knots, costs) -> None:
    with pytest.raises(ValueError, match="wake"):
        CostModel.model_validate({**BASE.model_dump(), "wake_knots_s": knots, "wake_costs_s": costs})


def test_the_fit_recovers_a_known_wake_up_cost_and_leaves_back_to_back_steps_alone() -> None:
    rng = np.random.default_rng(3)
    n, knots = 3000, power_of_two_knots(64)
    tokens = rng.integers(1, 64, n)
    # Most steps follow another after 0.1-2 ms of bookkeeping; one in five after an idle wait.
    idle = np.where(rng.random(n) < 0.2, 10 ** rng.uniform(-3, 0.5, n), rng.uniform(1e-4, 2e-3, n))
    truth_wake = [0.0, 0.0015, 0.0025]
    exact = 0.015 + 0.0004 * tokens + wake_basis(idle, WAKE_KNOTS_S) @ truth_wake[1:]
    seconds = exact * np.exp(rng.normal(0.0, 0.03, n))
    features = np.column_stack([tokens, np.zeros((n, 3)), idle])
    result = fit(features, seconds, knots)
    assert result.wake_costs_s[0] == 0.0
    assert result.wake_costs_s[1:] == pytest.approx(truth_wake[1:], abs=3e-4)
    curve = hat_basis(tokens, knots) @ result.token_costs_s
    assert np.median(curve / (0.015 + 0.0004 * tokens)) == pytest.approx(1.0, abs=0.01)


def test_the_fit_prices_the_mean_step_when_some_steps_run_slow() -> None:
    """Nine steps in ten at 0.95x the model and one at 1.45x (mean 1.0x): weighted by the
    measured seconds the fit would follow the fast majority; weighted by its prediction the
    fitted prices add up to what the steps took."""
    rng = np.random.default_rng(4)
    n = 4000
    tokens = rng.integers(1, 100, n)
    truth = 0.01 + 0.001 * tokens
    seconds = truth * np.where(rng.random(n) < 0.9, 0.95, 1.45)
    result = fit(np.column_stack([tokens, np.zeros((n, 4))]), seconds, power_of_two_knots(100))
    predicted = hat_basis(tokens, power_of_two_knots(100)) @ result.token_costs_s
    assert predicted.sum() == pytest.approx(seconds.sum(), rel=0.005)
    assert predicted.sum() == pytest.approx(truth.sum(), rel=0.01)


def test_the_simulator_charges_the_wake_up_once_per_idle_wait() -> None:
    """Two requests 1 s apart, each alone: the second's first step comes after an idle wait and
    costs the flat wake-up on top; back-to-back steps never do. Bulk decode steps or not, the
    same run to the bit."""
    workload = WorkloadConfig(num_requests=2, arrival="poisson", rate=0.01, preset=None, max_model_len=256, seed=2,
                              prompt=LengthDist(kind="fixed", value=10), output=LengthDist(kind="fixed", value=5))
    engine = EngineConfig(block_size=16, num_blocks=64, max_model_len=256)
    plain_result, plain = simulate(workload, engine, profile=BASE)
    woken_result, woken = simulate(workload, engine, profile=WOKEN)
    assert woken_result.steps.duration[0] == plain_result.steps.duration[0]  # the first step: no step before it
    extra = np.array(woken_result.steps.duration) - np.array(plain_result.steps.duration)
    assert extra[5] == pytest.approx(0.003) and np.delete(extra, 5) == pytest.approx(0.0, abs=1e-15)
    ttft, base_ttft = ([float(t) for t in sorted(c["first_token"] - c["arrival"])]
                       for c in (request_columns(woken_result.records), request_columns(plain_result.records)))
    assert ttft[1] == pytest.approx(base_ttft[1] + 0.003) and ttft[0] == base_ttft[0]
    assert woken.tpot_s.p50 == plain.tpot_s.p50


def test_a_timed_runner_records_how_long_the_engine_sat_idle(tiny_model) -> None:
    samples: list = []
    timed = TimedExecutor(ModelRunner(tiny_model), samples)
    engine = LLMEngine(timed, EngineConfig(block_size=4, num_blocks=32, max_model_len=64))
    engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step_sequences()
    time.sleep(0.05)
    engine.add_request("b", [4, 5], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step_sequences()
    features, _ = as_arrays(samples)
    idle = features[:, 4]
    assert idle[0] == 0.0 and (idle[1:3] < 0.03).all()  # back to back: the engine's bookkeeping only
    assert 0.05 <= idle[3] < 1.0
