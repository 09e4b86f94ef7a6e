"""Run a state machine with a budget and report what it did: what ``pagedkv check`` prints.

A failure comes back with hypothesis' reproduction: the shrunk run as the Python calls
that replay it (``state = Machine()``, ``state.rule(...)``, ...).
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from dataclasses import dataclass

import hypothesis
from hypothesis import HealthCheck, Phase, Verbosity, settings
from hypothesis.reporting import with_reporter
from hypothesis.stateful import get_state_machine_test

from pagedkv.testing.executor import WrongContext
from pagedkv.testing.machine import InvariantMachine, Tally

REPRODUCTION_IMPORTS = (
    "from pagedkv.scheduler import EngineConfig, SamplingParams\n"
    "from pagedkv.testing.strategies import RequestSpec, engine_config, pinned_config\n"
)
"""What a reproduction's arguments may name, besides the machine."""


@dataclass(frozen=True)
class MachineReport:
    machine: str
    examples: int
    steps: int
    checks: int
    """Invariant evaluations, over all examples and steps."""
    invariants: int
    """Distinct invariants evaluated."""
    seconds: float
    failure: str | None = None
    """The failed invariant or assertion, or ``None``: every example passed."""
    reproduction: str = ""
    """Hypothesis' shrunk failing run as Python calls, after the imports they need (empty
    when none failed): paste it to replay the failure."""

    @property
    def passed(self) -> bool:
        return self.failure is None


def run_machine(
    machine: type[InvariantMachine], examples: int = 100, steps: int = 40, seed: int | None = None,
    shrink: bool = True,
) -> MachineReport:
    """Run ``machine`` for ``examples`` runs of up to ``steps`` rules each (``seed``: the
    same runs every time). Resets the machine's ``tally`` and ``coverage``. Examples are
    not saved between runs (no hypothesis database), so a report depends on its
    arguments alone; ``shrink=False`` skips shrinking a failure (faster, longer
    reproduction)."""
    machine.tally, machine.coverage = Tally(), Counter()
    phases = [Phase.generate, Phase.shrink] if shrink else [Phase.generate]
    test = get_state_machine_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, database=None, phases=phases,
        suppress_health_check=list(HealthCheck), verbosity=Verbosity.normal, print_blob=False,
        report_multiple_bugs=False,  # the first distinct failure, not an ExceptionGroup of them
    ))
    if seed is not None:
        test = hypothesis.seed(seed)(test)
    lines: list[str] = []
    failure = None
    start = time.perf_counter()
    with with_reporter(lambda value: lines.append(str(value))):
        try:
            test()
        except (Exception, WrongContext) as e:  # the failing example's error, after shrinking
            first = e  # a teardown that fails too raises over the step's failure: report the step's
            while isinstance(first.__context__, AssertionError):
                first = first.__context__
            failure = f"{type(first).__name__}: {str(first) or _failed_line(first)}".splitlines()[0]
            lines += getattr(e, "__notes__", [])  # where hypothesis puts the falsifying example
    calls = [line for line in "\n".join(lines).splitlines() if not line.startswith("Failing test case")]
    tally = machine.tally
    return MachineReport(
        machine.__name__, tally.examples, tally.steps, tally.checks, len(tally.invariants),
        time.perf_counter() - start, failure,
        f"{REPRODUCTION_IMPORTS}from {machine.__module__} import {machine.__name__}\n" + "\n".join(calls)
        if failure else "",
    )


def _failed_line(error: BaseException) -> str:
    """Where a bare ``assert`` failed: its function and source line."""
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"in {frame.name}: {frame.line}"
