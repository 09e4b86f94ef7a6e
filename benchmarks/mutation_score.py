"""Mutation score of pagedkv.testing's state machines: seed realistic one-line bugs into a copy
of the bookkeeping and show that the machines kill every one within an example budget.

The copy is a temporary ``pagedkv`` package built from ``pagedkv/``, ``paged/`` and
``scheduler/`` (the layout the wheel installs), put first on ``PYTHONPATH`` of a fresh
interpreter per mutant; the source tree is never touched. Each mutant replaces one line (the
text must occur exactly once). Its interpreter runs the machines in turn (pool and tables,
prefix cache and swap, scheduler), each for up to ``--examples`` runs of ``--steps`` rules,
without shrinking, and stops at the first that fails. The unmutated copy must pass the same
budget first, or the score means nothing.

    python benchmarks/mutation_score.py [--examples 300] [--steps 40] [--seed 0]

Prints one row per mutant: the machine that killed it, what failed (the invariant, or the
model comparison), the runs that machine took to find it, and the time from the first
machine's start to the kill.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {"pagedkv": "pagedkv", "paged": "pagedkv/paged", "scheduler": "pagedkv/scheduler"}
"""Source folder -> where it lands in the copy."""


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    """Path inside the copy."""
    old: str
    new: str
    """``old`` (which may span lines, for context) becomes ``new``: one line changes."""


MUTANTS = [
    Mutant("free queue order flipped (MRU reuse)", "pagedkv/paged/block_pool.py",
           "self._free.popitem(last=False)[0]", "self._free.popitem(last=True)[0]"),
    Mutant("prefix entry not dropped on reuse", "pagedkv/paged/block_pool.py",
           "            if self._keys:\n                self._evict(b)",
           "            if self._keys:\n                pass"),
    Mutant("off-by-one in the room check (next block counted as room)", "pagedkv/paged/kv_manager.py",
           "elif num_tokens <= len(table.blocks) * self.block_size and",
           "elif num_tokens <= (len(table.blocks) + 1) * self.block_size and"),
    Mutant("off-by-one in the copy-on-write block count", "pagedkv/paged/kv_manager.py",
           "needed = blocks_for(num_tokens, self.block_size) - len(table.blocks) + int(cow)",
           "needed = blocks_for(num_tokens, self.block_size) - len(table.blocks)"),
    Mutant("ref count not decremented on the copy-on-write path", "pagedkv/paged/kv_manager.py",
           "self.pool.free([src])  # the other holders keep it", "pass  # the other holders keep it"),
    Mutant("fork that does not copy on write", "pagedkv/paged/kv_manager.py",
           "cow = table.last_block_partial and self.pool.is_shared(table.blocks[-1])", "cow = False"),
    Mutant("fork that takes no references", "pagedkv/paged/kv_manager.py",
           "self.pool.incref(parent.blocks)", "pass"),
    Mutant("prefix hit that takes no references", "pagedkv/paged/kv_manager.py",
           "self.pool.take(prefix.blocks)  # first", "pass  # first"),
    Mutant("decode grow counts the whole table (double count)", "pagedkv/paged/kv_manager.py",
           "            self._stored += num_tokens - table.num_tokens\n            table.num_tokens = num_tokens\n"
           "            return NOTHING",
           "            self._stored += num_tokens\n            table.num_tokens = num_tokens\n"
           "            return NOTHING"),
    Mutant("swap-in not freeing swap blocks", "pagedkv/paged/kv_manager.py",
           "granted = self._allocate(needed)\n        self.swap.release(seq_id)",
           "granted = self._allocate(needed)\n        pass"),
    Mutant("swap-out that keeps the device blocks", "pagedkv/paged/kv_manager.py",
           "pairs = list(zip(table.blocks, cpu, strict=True))\n        self.free(seq_id)",
           "pairs = list(zip(table.blocks, cpu, strict=True))\n        self._tables.pop(seq_id)"),
    Mutant("abort that misses a swapped-out request", "pagedkv/paged/kv_manager.py",
           "        if table is None:\n            self.swap.release(seq_id)",
           "        if table is None:\n            pass"),
    Mutant("free releases head first (evicts prefix heads first)", "pagedkv/paged/kv_manager.py",
           "self.pool.free(reversed(table.blocks))", "self.pool.free(table.blocks)"),
    Mutant("recompute preemption keeps its progress", "pagedkv/scheduler/scheduler.py",
           "            self.kv.free(request.seq_id)\n            request.num_computed_tokens = 0",
           "            self.kv.free(request.seq_id)\n            pass"),
    Mutant("preempted request queued at the back, not by rank", "pagedkv/scheduler/scheduler.py",
           "        self.num_preemptions += 1\n        insort(self.waiting, request, key=by_rank)",
           "        self.num_preemptions += 1\n        self.waiting.append(request)"),
    Mutant("never-fitting request accepted (off-by-one in the fit check)", "pagedkv/scheduler/queues.py",
           "if blocks > self.kv.num_blocks:", "if blocks > self.kv.num_blocks + 1:"),
]

RUN = """
import json, sys, time
import pagedkv
assert pagedkv.__file__.startswith(sys.argv[1]), f"imported {pagedkv.__file__}, not the mutated copy"
from pagedkv.testing import KVManagerMachine, PrefixCacheMachine, SchedulerMachine, run_machine
examples, steps, seed = map(int, sys.argv[2:5])
start, rows = time.perf_counter(), []
for machine in (KVManagerMachine, PrefixCacheMachine, SchedulerMachine):
    r = run_machine(machine, examples, steps, seed, shrink=False)
    rows.append({"machine": r.machine, "examples": r.examples, "failure": r.failure,
                 "seconds": time.perf_counter() - start})
    if r.failure:
        break
print(json.dumps(rows))
"""


def build_copy(where: Path) -> None:
    for src, dst in LAYOUT.items():
        shutil.copytree(ROOT / src, where / dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def run_machines(copy: Path, examples: int, steps: int, seed: int, timeout: float) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-c", RUN, str(copy), str(examples), str(steps), str(seed)]
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return [{"machine": "-", "examples": 0, "failure": f"timed out after {timeout:.0f} s", "seconds": timeout}]
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"the machines crashed:\n{e.stderr}") from None
    return json.loads(done.stdout.splitlines()[-1])


def mutate(copy: Path, mutant: Mutant) -> str:
    """Apply ``mutant`` to the copy; return the original text to restore."""
    path = copy / mutant.file
    text = path.read_text()
    if text.count(mutant.old) != 1:
        raise SystemExit(f"{mutant.name}: the text to replace occurs {text.count(mutant.old)} times in {mutant.file}")
    path.write_text(text.replace(mutant.old, mutant.new))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=300, help="most runs per machine (default 300)")
    parser.add_argument("--steps", type=int, default=40, help="most rules per run (default 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutant before it counts as alive")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pagedkv-mutants-") as tmp:
        copy = Path(tmp)
        build_copy(copy)
        baseline = run_machines(copy, args.examples, args.steps, args.seed, args.timeout)
        if any(row["failure"] for row in baseline):
            raise SystemExit(f"the unmutated copy fails: {baseline}")
        print(f"unmutated copy: all 3 machines pass {args.examples} examples of {args.steps} steps "
              f"in {baseline[-1]['seconds']:.1f} s\n")
        print("| # | mutant | killed by | what failed | runs | time |\n|---|---|---|---|---|---|")
        killed = 0
        for i, mutant in enumerate(MUTANTS, 1):
            original = mutate(copy, mutant)
            try:
                rows = run_machines(copy, args.examples, args.steps, args.seed, args.timeout)
            finally:
                (copy / mutant.file).write_text(original)
            last = rows[-1]
            failure = last["failure"]
            killed += failure is not None and not failure.startswith("timed out")
            what = failure.split(": ", 1)[-1][:90] if failure else "ALIVE"
            print(f"| {i} | {mutant.name} | {last['machine'] if failure else '-'} | {what} | "
                  f"{last['examples']} | {last['seconds']:.1f} s |", flush=True)
        print(f"\n{killed} of {len(MUTANTS)} mutants killed within {args.examples} examples per machine")


if __name__ == "__main__":
    main()
