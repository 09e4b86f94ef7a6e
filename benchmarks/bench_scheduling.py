"""Scheduling under pressure, in the simulator (the shipped SmolLM2 CPU profile, the real
scheduler and KV manager):

1. Long prompts among short chats, with and without chunked prefill: TTFT, and the time
   between consecutive output tokens (inter-token latency, every gap of every request),
   p50 and p99, for each kind of request. Without chunking a step either prefills whole
   prompts or decodes (vLLM v0), so chats stall behind every long prompt.
2. Memory pressure on a small pool: preemption by swap versus by recompute.

    python benchmarks/bench_scheduling.py [--requests 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import random

import numpy as np

from pagedkv.scheduler import EngineConfig
from pagedkv.sim.cost_model import DEFAULT_PROFILE, CostModel
from pagedkv.sim.driver import run_workload
from pagedkv.sim.executor import SimulatedExecutor, VirtualClock
from pagedkv.sim.metrics import request_columns, summarize
from pagedkv.sim.workload import RequestSpec, WorkloadConfig, generate


def mixed_workload(num_requests: int, rate: float, seed: int) -> list[RequestSpec]:
    """Poisson arrivals; one request in ten a long document (1500-3000 prompt tokens, 16
    new), the rest chats (20-100 prompt tokens, 32-96 new)."""
    rng = random.Random(seed)
    t, specs = 0.0, []
    for _ in range(num_requests):
        t += rng.expovariate(rate)
        if rng.random() < 0.1:
            specs.append(RequestSpec(t, rng.randint(1500, 3000), 16))
        else:
            specs.append(RequestSpec(t, rng.randint(20, 100), rng.randint(32, 96)))
    return specs


LONG = 1000  # prompts this long are documents, shorter ones chats


class GapRecorder(SimulatedExecutor):
    """The simulated executor, also noting every gap between two tokens of a sequence."""

    def __init__(self, cost: CostModel, clock: VirtualClock) -> None:
        super().__init__(cost, clock)
        self.last: dict = {}
        self.gaps: dict[str, list[float]] = {"chat": [], "long": []}

    def execute(self, plan):
        tokens = super().execute(plan)
        now = self.clock.now
        for s in plan.scheduled:
            if s.samples:
                seq = s.request.seq_id
                if seq in self.last:
                    self.gaps["long" if s.request.num_prompt_tokens >= LONG else "chat"].append(now - self.last[seq])
                self.last[seq] = now
        return tokens


def run(specs: list[RequestSpec], config: EngineConfig, cost: CostModel):
    clock = VirtualClock()
    executor = GapRecorder(cost, clock)
    # Every step must reach execute() to be seen: no bulk decode steps.
    result = run_workload(specs, config, executor, clock, "paged", fast_forward=False)
    return result, summarize(result), executor.gaps


def ttft_per_kind(result) -> dict[str, np.ndarray]:
    r = request_columns(result.records)
    arrival, first, prompt = r["arrival"], r["first_token"], r["prompt_len"]
    return {"chat": (first - arrival)[prompt < LONG], "long": (first - arrival)[prompt >= LONG]}


def chunked_prefill(cost: CostModel, num_requests: int, seed: int) -> None:
    specs = mixed_workload(num_requests, rate=0.12, seed=seed)
    print(f"1. {num_requests} requests at 0.12 req/s: 10% long documents (1500-3000 prompt tokens), 90% chats\n")
    print(f"{'policy':<32} {'kind':<5} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>9} {'ITL p99':>9} {'ITL max':>9}")
    for label, config in (
        ("chunked prefill, budget 512", EngineConfig(kv_cache_memory_bytes=512 * 2**20, max_num_batched_tokens=512)),
        ("chunked prefill, budget 2048", EngineConfig(kv_cache_memory_bytes=512 * 2**20, max_num_batched_tokens=2048)),
        ("no chunking (prefill or decode)", EngineConfig(kv_cache_memory_bytes=512 * 2**20, max_num_batched_tokens=8192,
                                                        enable_chunked_prefill=False)),
    ):
        result, _, gaps = run(specs, config, cost)
        for kind, ttft in ttft_per_kind(result).items():
            itl = np.array(gaps[kind])
            print(f"{label:<32} {kind:<5} {np.percentile(ttft, 50):>8.2f}s {np.percentile(ttft, 99):>8.2f}s "
                  f"{np.percentile(itl, 50) * 1e3:>7.0f}ms {np.percentile(itl, 99) * 1e3:>7.0f}ms {itl.max():>8.2f}s")


def swap_vs_recompute(cost: CostModel, num_requests: int, seed: int) -> None:
    workload = WorkloadConfig(preset="sharegpt", rate=0.2, num_requests=num_requests, seed=seed)
    specs = generate(workload)
    print(f"\n2. {num_requests} ShareGPT-like requests at 0.2 req/s on a 48 MiB pool "
          f"({48 * 2**20 // (cost.kv_bytes_per_token * 16)} blocks of 16 tokens), no watermark\n")
    print(f"{'preemption':<24} {'req/s':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p99':>9} {'preempted':>9} "
          f"{'by swap':>8} {'recomputed tokens':>17}")
    modes = (("recompute", "recompute", 0), ("swap, 256 MiB", "swap", 256), ("swap, 4 MiB", "swap", 4))
    for label, mode, swap in modes:
        config = EngineConfig(kv_cache_memory_bytes=48 * 2**20, preemption_mode=mode, swap_space_bytes=swap * 2**20,
                              kv_watermark=0.0)
        result, s, _ = run(specs, config, cost)
        stats = result.stats
        recomputed = stats.num_tokens_computed - stats.num_generated_tokens + s.completed - stats.num_prompt_tokens
        print(f"{label:<24} {s.requests_per_s:>6.3f} {s.ttft_s.p50:>8.1f}s {s.ttft_s.p99:>8.1f}s "
              f"{s.tpot_s.p99 * 1e3:>7.0f}ms {s.preemptions:>9} {stats.num_swapped_out:>8} {recomputed:>17}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cost = CostModel.load(DEFAULT_PROFILE)
    print(f"simulated with {cost.name}\n")
    chunked_prefill(cost, args.requests, args.seed)
    swap_vs_recompute(cost, args.requests, args.seed)


if __name__ == "__main__":
    main()
