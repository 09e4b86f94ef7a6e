"""How fast the simulator runs: N ShareGPT-like (or Alpaca-like) requests at a Poisson rate on
the shipped SmolLM2 CPU profile, timed on the wall clock, and the process's peak memory.

    python benchmarks/sim_scale.py [--requests 100000] [--preset sharegpt] [--rate 0.15] [--noise-seed 0]

With ``--noise-seed``, one run with step noise: what each of an interval's R runs costs
(``simulate_intervals`` runs R of them one after another).
"""

from __future__ import annotations

import argparse
import resource
import time

from pagedkv.scheduler import EngineConfig
from pagedkv.sim import WorkloadConfig, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--preset", choices=["sharegpt", "alpaca"], default="sharegpt")
    parser.add_argument("--rate", type=float, default=0.15)
    parser.add_argument("--kv-memory-mib", type=int, default=512)
    parser.add_argument("--noise-seed", type=int, default=None, help="step noise as drawn with this seed")
    args = parser.parse_args()
    workload = WorkloadConfig(num_requests=args.requests, preset=args.preset, rate=args.rate, seed=0)
    start = time.perf_counter()
    result, summary = simulate(workload, EngineConfig(kv_cache_memory_bytes=args.kv_memory_mib * 2**20), "paged",
                               noise_seed=args.noise_seed)
    seconds = time.perf_counter() - start
    steps = len(result.steps)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    noise = "" if args.noise_seed is None else f" with step noise (seed {args.noise_seed})"
    print(f"{args.requests} {args.preset} requests at {args.rate} req/s{noise}: {seconds:.1f} s wall, {steps} steps "
          f"({seconds / steps * 1e6:.1f} us/step), {summary.preemptions} preemptions, peak memory {peak_gib:.2f} GiB")


if __name__ == "__main__":
    main()
