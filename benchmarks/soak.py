"""A long soak of the scheduler and KV manager under pressure: many random requests (shared
prefixes, n > 1, priorities, stop tokens, random aborts) on a small pool, with a stand-in
executor that checks every token of every context each step (pagedkv.testing's
ContentExecutor, through tests/fakes.py). Prints what
happened; raises on the first lost request, leak, wrong token or empty step.

    python benchmarks/soak.py [--requests 20000] [--mode recompute|swap] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.fakes

from pagedkv.scheduler import EngineConfig  # noqa: E402
from pagedkv.scheduler.request import FinishReason  # noqa: E402
from tests.fakes import soak  # noqa: E402
from tests.helpers import assert_drained  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--mode", choices=["recompute", "swap"], default="swap")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = EngineConfig(block_size=2, num_blocks=30, max_num_batched_tokens=16, max_num_seqs=8,
                          preemption_mode=args.mode, swap_space_bytes=12 * 1024)
    start = time.perf_counter()
    engine, result = soak(args.requests, config, seed=args.seed)
    seconds = time.perf_counter() - start
    lost = set(result.submitted) - set(result.finished)
    if lost:
        raise SystemExit(f"lost requests: {sorted(lost)[:10]}")
    assert_drained(engine)
    stats = engine.stats()
    aborted = sum(why is FinishReason.ABORT for why in result.finished.values())
    print(f"{len(result.submitted)} requests in {result.steps} steps ({seconds:.1f} s): "
          f"{len(result.finished) - aborted} completed, {aborted} aborted, none lost; "
          f"{stats.num_preemptions} preemptions ({stats.num_swapped_out} by swap, "
          f"{stats.num_recomputed} by recompute); {engine.executor.num_checked_tokens} context tokens checked; "
          f"pool and swap space whole")


if __name__ == "__main__":
    main()
