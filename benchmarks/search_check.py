"""Does the configuration a capacity search chooses meet the SLO for real?

    python benchmarks/search_check.py [--profile P] [--rate 2.0] [--slo "ttft_p90<1s,tpot_p50<80ms"]

Runs ``capacity_search`` on a small space (KV memory 4-64 MiB, max_num_seqs 4 or 32, one
replica) for Poisson Alpaca requests at the given rate with the profile (the shipped one by
default: calibrate it the same day, `pagedkv sim calibrate`, for the machine's speed of the
hour), then runs on the real SmolLM2-135M engine (float32) the cheapest configuration the
search says meets the SLO, and the one just cheaper that it says does not, and prints both
side by side: each bound's simulated and real values and verdicts.
"""

from __future__ import annotations

import argparse
import time

import torch

from pagedkv.loader import load_model
from pagedkv.sim import WorkloadConfig, capacity_search, run_real
from pagedkv.sim.cost_model import DEFAULT_PROFILE, CostModel
from pagedkv.sim.search import Candidate, SearchSpace, meets, metric_value

MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=str(DEFAULT_PROFILE))
    parser.add_argument("--rate", type=float, default=2.0, help="requests per second")
    parser.add_argument("--slo", default="ttft_p90<1s,tpot_p50<80ms")
    parser.add_argument("--requests", type=int, default=80)
    args = parser.parse_args()
    profile = CostModel.load(args.profile)
    workload = WorkloadConfig(num_requests=args.requests, arrival="poisson", rate=args.rate, preset="alpaca",
                              seed=31, max_model_len=2048)
    space = SearchSpace(kv_cache_memory_bytes=[4 * MIB, 8 * MIB, 16 * MIB, 32 * MIB, 64 * MIB],
                        max_num_seqs=[4, 32], max_num_batched_tokens=[1024], replicas=[1])
    start = time.perf_counter()
    result = capacity_search(workload, args.slo, space, rate=args.rate, profile=profile)
    print(f"profile: {profile.name} ({profile.fit_note})")
    print(f"search: {result.simulations} simulations in {time.perf_counter() - start:.1f} s, "
          f"{workload.num_requests} Alpaca requests at {args.rate} req/s, SLO {args.slo}")
    chosen = result.frontier[0] if result.frontier else None
    if chosen is None:
        print("no configuration of the space meets the SLO at this rate: nothing to check")
        return
    cheaper = [c for c in result.candidates if not c.meets and c.cost_bytes < chosen.cost_bytes]
    checked: list[tuple[str, Candidate]] = [("chosen (cheapest that meets)", chosen)]
    if cheaper:
        same_others = chosen.engine.max_num_seqs  # among equally cheap ones, the chosen's other settings
        checked.append(("the next cheaper (fails)",
                        max(cheaper, key=lambda c: (c.cost_bytes, c.engine.max_num_seqs == same_others))))
    model, _ = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    print("\n| configuration | KV memory | max_num_seqs | bound | simulated | real | verdict: sim / real |")
    print("|---|---:|---:|---|---:|---:|---|")
    for label, candidate in checked:
        _, real = run_real(workload, candidate.engine, model, progress=True)
        simulated = candidate.summary
        assert simulated is not None
        verdicts = f"{'meets' if candidate.meets else 'fails'} / {'meets' if meets(real, result.slo) else 'fails'}"
        memory = (candidate.engine.kv_cache_memory_bytes or 0) // MIB
        for i, bound in enumerate(result.slo):
            sim_ms, real_ms = (metric_value(summary, bound.metric) * 1e3 for summary in (simulated, real))
            print(f"| {label if i == 0 else ''} | {memory} MiB | {candidate.engine.max_num_seqs} "
                  f"| {bound.metric} < {bound.seconds * 1e3:.0f} ms | {sim_ms:.0f} ms | {real_ms:.0f} ms "
                  f"| {verdicts if i == 0 else ''} |")
        print(f"|  |  |  | completed / rejected | {simulated.completed} / {simulated.rejected} "
              f"| {real.completed} / {real.rejected} |  |", flush=True)


if __name__ == "__main__":
    main()
