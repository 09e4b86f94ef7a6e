"""The workload simulator: reproducible workloads that hit their targets, a cost-model fit
that recovers known coefficients, balanced accounting under every policy, and a scheduler
that behaves the same whether the executor is simulated or a real model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pagedkv.models import ModelRunner
from pagedkv.scheduler import EngineConfig
from pagedkv.sim import CostModel, LengthDist, WorkloadConfig, generate, load_trace, save_trace, simulate, sweep
from pagedkv.sim.cost_model import Features, hat_basis, power_of_two_knots
from pagedkv.sim.driver import run_workload
from pagedkv.sim.executor import SimulatedExecutor, VirtualClock
from pagedkv.sim.fit import fit
from pagedkv.sim.metrics import summarize
from pagedkv.sim.policies import POLICIES
from pagedkv.sim.workload import TRACES

PROFILE = CostModel(
    name="test", token_knots=[1, 2, 1026], token_costs_s=[0.024, 0.03, 1.054],  # 20 ms + 4 ms, then about 1 ms/token
    per_decode_context_token_s=1e-6, per_prefill_attended_pair_s=1e-6,
    kv_bytes_per_token=1024, max_model_len=4096,
)
ENGINE = EngineConfig(block_size=16, kv_cache_memory_bytes=4 * 2**20, max_model_len=2048, max_num_batched_tokens=512)


# ---- workloads ---------------------------------------------------------------------


def test_workloads_are_reproducible_from_their_seed():
    config = WorkloadConfig(num_requests=300, arrival="gamma", cv=3.0, rate=2.0, prefix_groups=3, prefix_len=8, seed=11)
    assert generate(config) == generate(config)
    assert generate(config) != generate(config.model_copy(update={"seed": 12}))


@pytest.mark.parametrize("preset, prompt_mean, output_mean", [("sharegpt", 161, 338), ("alpaca", 19, 58)])
def test_presets_hit_the_published_means(preset, prompt_mean, output_mean):
    specs = generate(WorkloadConfig(num_requests=40_000, preset=preset, max_model_len=1_000_000, seed=1))
    assert np.mean([s.prompt_len for s in specs]) == pytest.approx(prompt_mean, rel=0.04)
    assert np.mean([s.output_len for s in specs]) == pytest.approx(output_mean, rel=0.04)


def test_lengths_are_clipped_to_the_model():
    specs = generate(WorkloadConfig(num_requests=5000, preset="sharegpt", max_model_len=512, seed=2))
    assert max(s.prompt_len + s.output_len for s in specs) <= 512
    assert min(s.prompt_len for s in specs) >= 1 and min(s.output_len for s in specs) >= 1


@pytest.mark.parametrize("arrival, cv", [("poisson", 1.0), ("gamma", 0.5), ("gamma", 3.0)])
def test_arrivals_have_the_target_rate_and_burstiness(arrival, cv):
    specs = generate(WorkloadConfig(num_requests=30_000, arrival=arrival, rate=4.0, cv=cv, seed=3))
    gaps = np.diff([s.arrival_time for s in specs])
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_fixed_uniform_and_offline():
    config = WorkloadConfig(num_requests=2000, arrival="offline", preset=None,
                            prompt=LengthDist(kind="fixed", value=7), output=LengthDist(kind="uniform", low=3, high=9))
    specs = generate(config)
    assert {s.arrival_time for s in specs} == {0.0}
    assert {s.prompt_len for s in specs} == {7}
    assert {s.output_len for s in specs} == set(range(3, 10))


def test_prefix_groups_share_their_prefix():
    specs = generate(WorkloadConfig(num_requests=200, prefix_groups=4, prefix_len=10, seed=5))
    by_group: dict[int, set] = {}
    for s in specs:
        assert s.prompt_token_ids is not None and s.prefix_group is not None
        assert len(s.prompt_token_ids) == s.prompt_len and s.prompt_len > 10
        by_group.setdefault(s.prefix_group, set()).add(s.prompt_token_ids[:10])
    assert len(by_group) == 4 and all(len(prefixes) == 1 for prefixes in by_group.values())


def test_trace_round_trip_and_the_shipped_sample(tmp_path):
    specs = generate(WorkloadConfig(num_requests=50, prefix_groups=2, prefix_len=4, seed=6))
    specs = [s._replace(priority=i % 3) for i, s in enumerate(specs)]
    save_trace(specs, tmp_path / "t.jsonl")
    loaded = load_trace(tmp_path / "t.jsonl")
    assert [(s.prompt_token_ids, s.output_len, s.prefix_group, s.priority) for s in loaded] == \
           [(s.prompt_token_ids, s.output_len, s.prefix_group, s.priority) for s in specs]
    assert [s.arrival_time for s in loaded] == pytest.approx([s.arrival_time for s in specs])
    sample = load_trace(TRACES / "sample.jsonl")
    assert len(sample) == 200 and any(s.priority for s in sample) and {s.prefix_group for s in sample} == {0, 1}


@pytest.mark.parametrize("line, message", [
    ('{"arrival_time": 0, "output_len": 3}', "prompt_len"),
    ('{"arrival_time": 0, "prompt_len": 0, "output_len": 3}', ">= 1"),
    ('{"arrival_time": 0, "prompt_len": 3000, "output_len": 3}', "exceeds max_model_len"),
    ("not json", "line 1"),
])
def test_bad_trace_lines_are_named(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        load_trace(tmp_path / "bad.jsonl", max_model_len=2048)


# ---- cost model ----------------------------------------------------------------------


def test_fit_recovers_a_known_curve_and_attention_and_sampling_prices():
    rng = np.random.default_rng(0)
    n, knots = 1500, power_of_two_knots(1024)
    curve = [0.03 + 0.01 * np.sqrt(k) + 0.001 * k for k in knots]  # concave then linear, like a CPU
    tokens = np.where(rng.random(n) < 0.7, rng.integers(1, 64, n), rng.integers(1, 1024, n))
    context = tokens * rng.integers(10, 600, n)
    pairs = np.where(rng.random(n) < 0.5, tokens * rng.integers(1, 600, n), 0)
    samples = np.minimum(tokens, rng.integers(1, 64, n))
    exact = hat_basis(tokens, knots) @ curve + 2e-5 * context + 2e-6 * pairs + 1e-3 * samples
    seconds = exact * rng.normal(1.0, 0.01, n)
    result = fit(np.column_stack([tokens, context, pairs, samples, np.zeros(n)]), seconds, knots)  # 1% noise above
    assert result.token_costs_s == pytest.approx(curve, rel=0.05)
    assert result[1:4] == pytest.approx((2e-5, 2e-6, 1e-3), rel=0.05)
    assert result.median_relative_error < 0.02


def test_fit_never_returns_negative_prices():
    rng = np.random.default_rng(1)
    features = np.column_stack([rng.integers(1, 100, (200, 4)), np.zeros(200)])
    seconds = (0.05 + 0.001 * features[:, 0] - 0.0001 * features[:, 1] - 0.0002 * features[:, 3]
               + rng.normal(0, 1e-4, 200))
    result = fit(features, seconds, power_of_two_knots(100))
    assert min(result.token_costs_s) >= 0 and min(result[1:4]) >= 0


def test_cost_curve_interpolates_between_knots_and_extends_the_last_segment():
    assert PROFILE.tokens_time(1) == pytest.approx(0.024)
    assert PROFILE.tokens_time(513) == pytest.approx(0.03 + 511 * 0.001)
    assert PROFILE.tokens_time(2048) == pytest.approx(0.03 + 2046 * 0.001)


@pytest.mark.parametrize("bad", [dict(token_knots=[1]), dict(token_knots=[4, 2]), dict(token_costs_s=[0.1, -1.0]),
                                 dict(token_costs_s=[0.1, 0.2, 0.3])])
def test_malformed_profiles_are_refused(bad):
    fields = dict(name="x", token_knots=[1, 2], token_costs_s=[0.1, 0.2], per_decode_context_token_s=0,
                  per_prefill_attended_pair_s=0, kv_bytes_per_token=1, max_model_len=8)
    with pytest.raises(ValueError, match="token_"):
        CostModel(**{**fields, **bad})


def test_shipped_profile_loads_and_predicts_positive_times():
    profile = CostModel.load()
    assert profile.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4  # SmolLM2-135M, float32
    assert min(profile.token_costs_s) > 0 and profile.tokens_time(1) < profile.tokens_time(1024)


# ---- runs ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("arrival", ["poisson", "closed"])
def test_every_request_arrives_once_and_finishes_once_and_the_pool_is_whole(policy, arrival):
    workload = WorkloadConfig(num_requests=150, arrival=arrival, rate=3.0, concurrency=6, preset="alpaca", seed=4)
    specs = generate(workload)
    clock = VirtualClock()
    executor = SimulatedExecutor(PROFILE, clock)
    result = run_workload(specs, ENGINE, executor, clock, policy, concurrency=6 if arrival == "closed" else None)
    assert len(result.records) + result.rejected == len(specs) and result.rejected == 0
    assert sorted(r.output_len for r in result.records) == sorted(s.output_len for s in specs)
    stats = result.stats
    assert stats is not None
    assert sum(r.output_len for r in result.records) == stats.num_generated_tokens
    for r in result.records:
        assert r.first_token is not None and r.arrival <= r.first_scheduled <= r.first_token <= r.finish
    assert stats.num_running == stats.num_waiting == 0
    assert stats.kv_blocks_used == 0
    assert clock.now == pytest.approx(max(r.finish for r in result.records))
    assert executor.busy_seconds <= clock.now + 1e-9


def test_reservation_wastes_memory_that_paging_does_not():
    workload = WorkloadConfig(num_requests=120, rate=50.0, preset="sharegpt", max_model_len=2048, seed=9)
    summaries = {p: simulate(workload, ENGINE, p, PROFILE)[1] for p in POLICIES}
    assert summaries["paged"].kv_waste < 0.06
    assert summaries["reserve-max-tokens"].kv_waste > 0.2
    assert summaries["reserve-max-len"].kv_waste > 0.6
    assert summaries["paged"].requests_per_s > summaries["reserve-max-len"].requests_per_s


def test_static_batches_admit_only_when_the_previous_batch_drained():
    workload = WorkloadConfig(num_requests=40, arrival="offline", preset=None, max_model_len=32,
                              prompt=LengthDist(kind="fixed", value=8),
                              output=LengthDist(kind="uniform", low=1, high=30))
    engine = EngineConfig(block_size=16, num_blocks=10, max_model_len=32, max_num_batched_tokens=512)  # 5 slots of 32
    result, _ = simulate(workload, engine, "static", PROFILE)
    starts = sorted({r.first_scheduled for r in result.records})
    finishes = sorted(r.finish for r in result.records)
    for start in starts[1:]:  # a new batch starts exactly when the last request before it finished
        assert start == pytest.approx(max(f for f in finishes if f <= start + 1e-12))
    assert len(starts) == 8  # 40 requests in batches of 5


def test_the_scheduler_cannot_tell_a_simulated_executor_from_a_real_model(tiny_model):
    """Same workload, same config: the simulated and the real executor see the same plans."""
    specs = generate(WorkloadConfig(num_requests=12, arrival="offline", preset=None, vocab_size=256,
                                    prompt=LengthDist(kind="uniform", low=5, high=60),
                                    output=LengthDist(kind="uniform", low=1, high=20), seed=8))
    engine = EngineConfig(block_size=4, num_blocks=40, max_num_batched_tokens=32, max_model_len=256)

    class Recording:
        def __init__(self, inner):
            self.inner, self.plans = inner, []
            self.vocab_size, self.max_model_len, self.eos_token_id = inner.vocab_size, 256, None

        def initialize_cache(self, config):
            return self.inner.initialize_cache(config)

        def execute(self, plan):
            self.plans.append([(s.request.request_id, s.start, s.num_new_tokens) for s in plan.scheduled])
            return self.inner.execute(plan)

    real, simulated = Recording(ModelRunner(tiny_model)), Recording(SimulatedExecutor(PROFILE, VirtualClock()))
    run_workload(specs, engine, real, VirtualClock())
    run_workload(specs, engine, simulated, simulated.inner.clock)
    assert real.plans == simulated.plans and len(real.plans) > 20


def test_summary_numbers_match_hand_computed_ones():
    workload = WorkloadConfig(num_requests=1, arrival="offline", preset=None,
                              prompt=LengthDist(kind="fixed", value=10), output=LengthDist(kind="fixed", value=5))
    engine = EngineConfig(block_size=16, num_blocks=4, max_model_len=64)
    result, summary = simulate(workload, engine, "paged", PROFILE)
    prefill = 0.03 + 8 * 0.001 + 10 * 10 * 1e-6  # a step with one chunk of 10 prompt tokens, up to 10 keys each
    decode = [0.024 + (11 + i) * 1e-6 for i in range(4)]
    assert summary.ttft_s.p50 == pytest.approx(prefill)
    assert summary.e2e_s.p50 == pytest.approx(prefill + sum(decode))
    assert summary.tpot_s.p50 == pytest.approx(sum(decode) / 4)
    assert summary.output_tokens_per_s == pytest.approx(5 / (prefill + sum(decode)))
    stored = [10, 11, 12, 13, 14]  # slots in use during the prefill step and each decode step
    assert summary.kv_utilization == pytest.approx(np.average(stored, weights=[prefill, *decode]) / 16)
    assert summary.kv_occupancy == pytest.approx(16 / 64)  # one block of the four, the whole time


def test_sweep_finds_a_higher_sustained_rate_for_paging():
    workload = WorkloadConfig(num_requests=150, preset="sharegpt", max_model_len=2048, seed=10)
    engine = EngineConfig(block_size=16, kv_cache_memory_bytes=8 * 2**20, max_model_len=2048,
                          max_num_batched_tokens=1024)
    result = sweep(workload, [0.5, 1, 2, 4, 8], ["paged", "reserve-max-len"], engine, PROFILE)
    assert result.sustained_rate["paged"] > result.sustained_rate["reserve-max-len"]


def test_a_policy_that_completes_nothing_sustains_no_rate_and_says_so(caplog):
    """reserve-max-len reserves 4096 slots per request in a pool of 2048: it rejects every
    request, its latencies are NaN, and NaN never exceeding the budget must not make it sustain
    the highest rate (as it once did); the run warns instead of printing a quiet table of NaN."""
    workload = WorkloadConfig(num_requests=30, preset="alpaca", seed=3)
    engine = EngineConfig(block_size=16, kv_cache_memory_bytes=2 * 2**20, max_model_len=4096)
    with caplog.at_level("WARNING", logger="pagedkv.sim.api"):
        result = sweep(workload, [0.5, 1, 2], ["paged", "reserve-max-len"], engine, PROFILE)
    assert [s.completed for s in result.curves["reserve-max-len"]] == [0, 0, 0]
    assert np.isnan(result.curves["reserve-max-len"][0].normalized_latency_s.p50)
    assert result.sustained_rate == {"paged": 2, "reserve-max-len": 0.0}
    assert "policy reserve-max-len completed no request (30 rejected" in caplog.text
    assert "policy paged" not in caplog.text


def test_summarize_of_a_run_round_trips_through_json():
    workload = WorkloadConfig(num_requests=20, preset="alpaca", seed=1)
    result, summary = simulate(workload, ENGINE, "paged", PROFILE)
    assert json.loads(summary.model_dump_json())["completed"] == 20
    assert summarize(result) == summary


# ---- command line ---------------------------------------------------------------------


def test_cli_run_prints_a_table_and_writes_json_and_plots(tmp_path, capsys):
    from pagedkv import cli

    pytest.importorskip("matplotlib")
    argv = ["sim", "run", "--num-requests", "60", "--preset", "alpaca", "--rate", "2",
            "--policy", "paged,reserve-max-len",
            "--kv-cache-memory-bytes", "64MiB", "--out", str(tmp_path), "--plots"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "KV memory waste" in out and "reserve-max-len" in out and "goodput" in out
    payload = json.loads((tmp_path / "results.json").read_text())
    assert [s["policy"] for s in payload["summaries"]] == ["paged", "reserve-max-len"]
    assert (tmp_path / "kv_memory.png").stat().st_size > 0 and (tmp_path / "latency_cdf.png").stat().st_size > 0


def test_cli_sweep_reports_sustained_rates(tmp_path, capsys):
    from pagedkv import cli

    pytest.importorskip("matplotlib")
    argv = ["sim", "sweep", "--rates", "0.5,1,2", "--num-requests", "40", "--policy", "paged,static",
            "--kv-cache-memory-bytes", "64MiB", "--out", str(tmp_path), "--plots"]
    assert cli.main(argv) == 0
    assert "sustained rate" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "sweep.json").read_text())["sustained_rate"]) == {"paged", "static"}
    assert (tmp_path / "latency_vs_rate.png").exists()


def test_cli_calibrate_writes_a_usable_profile(tmp_path, tiny_model):
    from pagedkv import cli

    assert cli.main(["sim", "calibrate", "--model", "tiny", "--out", str(tmp_path / "p.json")]) == 0
    profile = CostModel.load(tmp_path / "p.json")
    assert profile.kv_bytes_per_token == tiny_model.kv_cache_spec().bytes_per_block(1)
    assert "timed steps" in profile.fit_note and profile.tokens_time(1) > 0


def test_a_real_run_on_a_loaded_model_times_every_step_it_takes(tiny_model):
    from pagedkv.sim import run_real
    from pagedkv.sim.calibrate import as_arrays

    workload = WorkloadConfig(num_requests=6, arrival="offline", preset=None, max_model_len=64, seed=1,
                              prompt=LengthDist(kind="uniform", low=2, high=20),
                              output=LengthDist(kind="fixed", value=5))
    timings: list[tuple[Features, float]] = []
    result, summary = run_real(workload, EngineConfig(block_size=4, num_blocks=64, max_num_batched_tokens=32),
                               tiny_model, timings=timings)
    assert summary.completed == 6 and len(timings) == len(result.steps.duration)
    features, seconds = as_arrays(timings)
    assert features[:, 0].sum() == sum(r.prompt_len for r in result.records) + 6 * (5 - 1)  # every token once
    # Each step counts the engine's bookkeeping since the previous one (no idle wait in a burst):
    # together they span the run, from the first step's start to the last one's end.
    steps = result.steps
    assert (seconds > 0).all()
    assert seconds.sum() <= steps.end[-1] - (steps.end[0] - steps.duration[0]) + 1e-4
    assert seconds.sum() >= sum(steps.duration) * 0.5


def test_the_calibration_in_parts_runs_every_burst_in_every_part_and_shares_out_the_streams():
    from pagedkv.sim.calibrate import calibration_workloads

    whole = calibration_workloads(2048, seed=0)
    parts = [calibration_workloads(2048, seed=0, part=p, parts=3) for p in range(3)]
    for w, _ in whole:
        taken = [t for part in parts for t, _ in part if t.model_copy(update={"num_requests": w.num_requests}) == w]
        if w.arrival == "offline":
            assert [t.num_requests for t in taken] == [w.num_requests] * 3  # every part runs it whole
        else:
            assert [t.num_requests for t in taken] == [round(w.num_requests / 3)] * 3
    assert {w.arrival for w, _ in whole} >= {"offline", "poisson", "closed"}


def test_a_timed_runner_keeps_its_swap_space(tiny_model):
    from pagedkv.sim.calibrate import TimedExecutor

    timed = TimedExecutor(ModelRunner(tiny_model))
    layout = timed.initialize_cache(EngineConfig(block_size=4, num_blocks=16, preemption_mode="swap",
                                                 swap_space_bytes=2**20))
    assert layout.num_swap_blocks > 0


@pytest.mark.parametrize("argv, message", [
    (["sim", "run", "--policy", "fifo"], "unknown policy fifo"),
    (["sim", "run", "--prefix-groups", "2"], "prefix_groups needs prefix_len"),
])
def test_cli_bad_sim_arguments_exit_2(capsys, argv, message):
    from pagedkv import cli

    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_requests_that_can_never_fit_are_counted_as_rejected():
    """A pool smaller than one max-length reservation: every request is refused, none hangs."""
    workload = WorkloadConfig(num_requests=30, preset="alpaca", max_model_len=2048, seed=3)
    engine = EngineConfig(block_size=16, num_blocks=10, max_model_len=2048)
    result, summary = simulate(workload, engine, "reserve-max-len", PROFILE)
    assert (summary.completed, summary.rejected) == (0, 30)


@pytest.mark.parametrize("policy", ["paged", "reserve-max-len"])
def test_checking_invariants_every_step_finds_nothing_and_changes_nothing(policy):
    """The debug mode (EngineConfig.check_invariants) runs the whole catalogue after every
    step, bulk decode runs included, under preemption; the results are the same to the byte."""
    workload = WorkloadConfig(num_requests=60, preset="sharegpt", rate=4.0, seed=9)
    engine = ENGINE.model_copy(update={"kv_cache_memory_bytes": 2 * 2**20})
    _, plain = simulate(workload, engine, policy, PROFILE)
    _, checked = simulate(workload, engine.model_copy(update={"check_invariants": 1}), policy, PROFILE)
    assert checked.model_dump_json() == plain.model_dump_json()
    assert plain.preemptions > 0 or policy != "paged"
