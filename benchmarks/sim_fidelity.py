"""How close is the simulator to the real engine? The same workloads, run both ways.

For each workload the real engine (SmolLM2-135M, float32, this machine's CPU, wall clock)
and the simulator (same scheduler and KV manager, the calibrated cost model, virtual
clock) serve the same requests; the script prints throughput and latency side by side with
the simulator's error.

  offline burst : 48 Alpaca-length requests at once (throughput at capacity)
  poisson       : 64 Alpaca-length requests at 1 req/s (queueing and TTFT under load)

    python benchmarks/sim_fidelity.py [--profile sim/profiles/...json]     # about 5 minutes
    python benchmarks/sim_fidelity.py --calibrate [--save-profile P]      # about 8 minutes
    python benchmarks/sim_fidelity.py --calibrate --repeats 5             # about 13 minutes

Each real workload runs ``--repeats`` times (3; the burst three times as often, see
RUNS_PER_TURN) and the simulator is compared with the median run (with five, the real median
and the calibration both span more of the machine's minutes); the spread between the real runs
is printed beside it, as the yardstick of what "within 5%" can mean on this machine.

The "noisy median" column is the intervals' own central value, the median of the simulations with
noise: the central value a prediction interval reports, scored against the real median. Beside it,
"simulated" is the one noiseless simulation. Real steps vary in length and their speed wanders over
seconds; the noiseless run's steps do neither, so a request arriving mid-step waits less in it and
requests' paces spread less (docs/simulator.md, "Prediction intervals").

The "in sample" columns price the simulation with a profile fitted on the real runs' own
steps, each run a part of its own (so the prices are the median run's): what is left of the
error there is the simulator's (scheduling, the form of the cost model), not the calibration's.

This VM's speed drifts: the same decode step takes 37 to 48 ms from one minute to the
next, and a profile fitted minutes before a run can be 20% off for a whole run. So
``--calibrate`` fits a fresh profile on calibration runs taken in turns with the real
ones (a third of the calibration before each repeat: a third of each stream's requests
and one of the three bursts): the profile and the real runs see the same minutes.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from pagedkv.loader import load_model
from pagedkv.scheduler import EngineConfig
from pagedkv.sim import WorkloadConfig, run_real, simulate, simulate_intervals
from pagedkv.sim.api import INTERVAL_METRICS
from pagedkv.sim.calibrate import Timed, as_arrays, collect_samples, fit_parts, fit_profile, profile_name
from pagedkv.sim.cost_model import DEFAULT_PROFILE, CostModel
from pagedkv.sim.metrics import Summary

WORKLOADS = {
    "offline burst": WorkloadConfig(num_requests=48, arrival="offline", preset="alpaca", seed=21),
    "poisson 1 req/s": WorkloadConfig(num_requests=64, arrival="poisson", rate=1.0, preset="alpaca", seed=22),
}
RUNS_PER_TURN = {"offline burst": 3, "poisson 1 req/s": 1}
"""The burst's TTFT is the time of its first step, one step per run, and that step's time moved by
0.87-1.72x from run to run in one sitting (2026-12-02 12:27): so the burst, 5 s a run, runs three
times a turn, and its median is one of 15 runs with ``--repeats 5``. The Poisson run takes a minute."""

def save_steps(path: str, parts: list[Timed], timings: dict[str, list], steps_per_run: dict[str, list[int]],
               reals: dict[str, list[Summary]]) -> None:
    """The sitting's timed steps as arrays: ``part{i}_features/seconds/workloads`` for each
    calibration part, ``real{j}_features/seconds/run`` for each workload (in WORKLOADS' order) and
    ``real{j}_metrics``, each run's INTERVAL_METRICS in their order."""
    arrays: dict[str, np.ndarray] = {}
    for i, part in enumerate(parts):
        arrays.update({f"part{i}_features": part.features, f"part{i}_seconds": part.seconds,
                       f"part{i}_workloads": part.workloads})
    for j, name in enumerate(WORKLOADS):
        features, seconds = as_arrays(timings[name])
        arrays.update({f"real{j}_features": features, f"real{j}_seconds": seconds,
                       f"real{j}_run": np.repeat(np.arange(len(steps_per_run[name])), steps_per_run[name]),
                       f"real{j}_metrics": np.array([[get(r) for get in INTERVAL_METRICS.values()]
                                                     for r in reals[name]])})
    np.savez_compressed(path, **arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=str(DEFAULT_PROFILE))
    parser.add_argument("--calibrate", action="store_true",
                        help="fit a fresh profile in turns with the real runs (and use it)")
    parser.add_argument("--save-profile", help="where to write the fresh profile")
    parser.add_argument("--repeats", type=int, default=3,
                        help="turns of calibration and real runs (the burst: 3 runs a turn); the real median is scored")
    parser.add_argument("--save-steps", help="write every timed step (calibration parts and real runs) to this .npz, "
                                             "to refit offline")
    parser.add_argument("--intervals", type=int, default=20,
                        help="simulations with step noise per workload for the 90%% intervals (0: none; the "
                             "profile must record step noise, as a --calibrate one does)")
    args = parser.parse_args()
    engine = EngineConfig(block_size=16, kv_cache_memory_bytes=256 * 2**20, max_num_batched_tokens=1024,
                          max_model_len=2048)
    model, _ = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    parts: list[Timed] = []
    reals, timings = {name: [] for name in WORKLOADS}, {name: [] for name in WORKLOADS}
    steps_per_run: dict[str, list[int]] = {name: [] for name in WORKLOADS}
    for turn in range(args.repeats):
        if args.calibrate:
            parts.append(
                collect_samples(model, engine.block_size, engine.max_num_batched_tokens, turn, turn, args.repeats))
        for name, workload in WORKLOADS.items():
            for _ in range(RUNS_PER_TURN[name]):
                before = len(timings[name])
                reals[name].append(run_real(workload, engine, model, progress=True, timings=timings[name])[1])
                steps_per_run[name].append(len(timings[name]) - before)
    if args.calibrate:
        profile = fit_parts(model, profile_name("smollm2-135m", torch.float32), parts, engine.max_num_batched_tokens)
    else:
        profile = CostModel.load(args.profile)
    if args.save_profile:
        profile.save(args.save_profile)
    if args.save_steps:
        save_steps(args.save_steps, parts, timings, steps_per_run, reals)
    wake = ", ".join(f"{c * 1e3:.2f} ms after {k:g} s" for k, c in zip(profile.wake_knots_s, profile.wake_costs_s,
                                                                        strict=True))
    print(f"profile: {profile.name} ({profile.fit_note}); wake-up: {wake or 'none'}; light load: "
          f"{profile.light_load_slowdown:+.1%} within {profile.light_load_window_s:g} s of an idle wait; step noise "
          f"{profile.noise_slow_share:.0%} slow (correlation time {profile.noise_corr_s:.2f} s)\n")
    for name, workload in WORKLOADS.items():
        _, simulated = simulate(workload, engine, "paged", profile)
        runs = len(reals[name])
        run_of_step = np.repeat(np.arange(runs), steps_per_run[name])
        own = fit_profile(model, f"{name}, in sample", *as_arrays(timings[name]), engine.max_num_batched_tokens,
                          parts=run_of_step if runs > 1 else None)
        _, in_sample = simulate(workload, engine, "paged", own)
        intervals = (simulate_intervals(workload, engine, args.intervals, profile=profile, vary_workload=False)
                     if args.intervals else None)
        print(f"{name}: {workload.num_requests} requests; real: median of {runs} runs (min to max);")
        print(f"  in sample: priced by a profile fitted on the real runs' own steps ({own.fit_note})")
        if intervals:
            print(f"  noisy median, interval: the median and central 90% of {args.intervals} simulations of the same "
                  "requests with step and run noise")
        print(f"  {'metric':<22} {'real':>8} {'(spread)':>17} {'simulated':>10} {'error':>7} "
              f"{'in sample':>10} {'error':>7}"
              + (f" {'noisy median':>12} {'error':>7} {'interval':>19} {'holds real':>10}" if intervals else ""))
        for label, get in INTERVAL_METRICS.items():
            runs = sorted(get(r) for r in reals[name])
            r, s, i = statistics.median(runs), get(simulated), get(in_sample)
            line = (f"  {label:<22} {r:8.3f} {f'({runs[0]:.3f} to {runs[-1]:.3f})':>17} {s:10.3f} {(s - r) / r:+7.1%}"
                    f" {i:10.3f} {(i - r) / r:+7.1%}")
            if intervals:
                iv = intervals.metrics[label]
                line += (f" {iv.central:12.3f} {(iv.central - r) / r:+7.1%}"
                         f" {f'[{iv.low:.3f}, {iv.high:.3f}]':>19} {'yes' if r in iv else 'no':>10}")
            print(line)
        print(flush=True)


if __name__ == "__main__":
    main()
