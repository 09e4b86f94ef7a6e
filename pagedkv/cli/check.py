"""``pagedkv check``: run the state machines of ``pagedkv.testing`` and print what they did.

Without ``--config`` each machine draws its own configurations (block sizes, pool sizes,
budgets, preemption modes, ...): the widest search. With ``--config FILE`` (a JSON object
of :class:`EngineConfig` fields) they are pinned to that engine configuration; only the
pool size is still drawn small unless the file gives ``num_blocks``, because bugs show
where memory runs out, and so is the swap space. ``--machine module:Class`` runs your own
machine (a subclass with your admission policy or manager) instead of the built-in ones;
``--config`` pins it too if it subclasses one of them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pagedkv.scheduler.config import EngineConfig

if TYPE_CHECKING:
    from pagedkv.testing import InvariantMachine, MachineReport


def add_command(commands: argparse._SubParsersAction) -> None:
    check = commands.add_parser("check", help="property-test the allocator's and the scheduler's invariants")
    check.add_argument("--examples", type=int, default=100, metavar="N", help="runs per machine (default 100)")
    check.add_argument("--steps", type=int, default=40, metavar="K", help="most rules per run (default 40)")
    check.add_argument("--config", type=Path, metavar="FILE", help="a JSON file of EngineConfig fields to pin to")
    check.add_argument("--seed", type=int, default=0, metavar="S",
                       help="the runs drawn (default 0; the same seed, the same runs)")
    check.add_argument("--machine", action="append", metavar="MODULE:CLASS",
                       help="a machine of your own to run instead of the built-in ones (repeatable)")
    check.set_defaults(run=run)


def load_config(path: Path) -> EngineConfig:
    """The engine config in ``path``: a JSON object of :class:`EngineConfig` fields."""
    fields = json.loads(path.read_text())
    if not isinstance(fields, dict):
        raise ValueError(f"--config {path}: expected a JSON object of EngineConfig fields, got {type(fields).__name__}")
    return EngineConfig(**fields)


def pinned(machine: type[InvariantMachine], config: EngineConfig) -> type[InvariantMachine]:
    """``machine`` (a built-in machine or a subclass of one) drawing its configurations
    from ``config``: its block size, policy knobs and preemption mode, its pool size if
    it gives one."""
    from hypothesis import strategies as st

    from pagedkv.testing import KVManagerMachine, PrefixCacheMachine, SchedulerMachine
    from pagedkv.testing.scheduler_machine import MAX_LEN
    from pagedkv.testing.strategies import engine_configs

    block_size = st.just(config.block_size)

    def pool(least: int, most: int) -> st.SearchStrategy[int]:
        return st.just(config.num_blocks) if config.num_blocks else st.integers(least, most)

    if issubclass(machine, SchedulerMachine):
        return machine.with_initial("setup", config=engine_configs(MAX_LEN, base=config))
    if issubclass(machine, PrefixCacheMachine):
        swap = st.integers(0, 8) if config.preemption_mode == "swap" else st.just(0)
        return machine.with_initial("make", block_size=block_size, num_blocks=pool(2, 12), num_swap_blocks=swap)
    if issubclass(machine, KVManagerMachine):
        return machine.with_initial("make_manager", block_size=block_size, num_blocks=pool(1, 24))
    raise ValueError(f"--config pins only the built-in machines and their subclasses, not {machine.__name__}")


def import_machine(spec: str) -> type[InvariantMachine]:
    from pagedkv.testing import InvariantMachine

    module, _, name = spec.partition(":")
    try:
        machine = getattr(importlib.import_module(module), name, None) if name else None
    except ImportError as e:
        raise ValueError(f"--machine {spec}: {e}") from e
    if not (isinstance(machine, type) and issubclass(machine, InvariantMachine)):
        raise ValueError(f"--machine {spec}: expected module:Class naming a pagedkv.testing.InvariantMachine subclass")
    return machine


def rows(reports: list[MachineReport]) -> list[str]:
    """The table: a header, then one aligned line per machine."""
    cells = [("machine", "examples", "steps", "invariants", "checks", "time", "result")]
    for r in reports:
        cells.append((r.machine, str(r.examples), str(r.steps), str(r.invariants), str(r.checks),
                      f"{r.seconds:.1f} s", "ok" if r.passed else "FAILED"))
    first = max(len(row[0]) for row in cells)
    return ["  ".join(c.ljust(first) if i == 0 else c.rjust(10) for i, c in enumerate(row)) for row in cells]


def run(args: argparse.Namespace) -> int:
    from pagedkv.testing import KVManagerMachine, PrefixCacheMachine, SchedulerMachine, run_machine

    if args.examples < 1 or args.steps < 1:
        raise ValueError("--examples and --steps must be at least 1")
    machines = [import_machine(m) for m in args.machine or ()] or [
        KVManagerMachine, PrefixCacheMachine, SchedulerMachine,
    ]
    if args.config:
        config = load_config(args.config)
        machines = [pinned(m, config) for m in machines]
    reports = []
    for machine in machines:
        print(f"checking {machine.__name__} ...", file=sys.stderr, flush=True)
        reports.append(run_machine(machine, args.examples, args.steps, args.seed))
    print("\n".join(rows(reports)))
    print(f"total {sum(r.seconds for r in reports):.1f} s")
    for machine, r in zip(machines, reports, strict=True):
        if not r.passed:
            print(f"\n{r.machine} FAILED: {r.failure}")
            print(f"reproduction (from {machine.__module__} import {r.machine}):\n{r.reproduction}")
    return 0 if all(r.passed for r in reports) else 1
