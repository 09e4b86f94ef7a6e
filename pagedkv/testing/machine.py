"""The base of every state machine here: it runs catalogue checks and counts what a run did.

A machine's ``@invariant`` methods call :meth:`InvariantMachine.expect` with checks from
:mod:`pagedkv.testing.invariants`; a failed one raises :class:`InvariantViolated`, which
names the invariant and the offending block or request. ``tally`` counts examples, steps
and checks for ``pagedkv check``'s table; ``coverage`` counts which interesting paths the
runs took (refusals, copy-on-write, preemptions, ...), so that a test can prove the checks
were not vacuous. Both are per class: :func:`pagedkv.testing.runner.run_machine` gives the
machine fresh ones for each run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar, NoReturn, TypeVar

from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant
from hypothesis.strategies import SearchStrategy

from pagedkv.paged.invariants import Check, Violation, violations

T = TypeVar("T")


class InvariantViolated(AssertionError):
    """One or more invariants failed; ``violations`` says which, and where."""

    def __init__(self, found: list[Violation]) -> None:
        super().__init__("; ".join(str(v) for v in found))
        self.violations = found


@dataclass
class Tally:
    """What runs of one machine did."""

    examples: int = 0
    steps: int = 0
    checks: int = 0
    """Invariant evaluations."""
    invariants: set[str] = field(default_factory=set)
    """The names of the invariants evaluated."""


class InvariantMachine(RuleBasedStateMachine):
    tally: ClassVar[Tally] = Tally()
    coverage: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.tally.examples += 1

    def expect(self, checks: Iterable[Check[T]], subject: T) -> None:
        """Run ``checks`` on ``subject``; raise :class:`InvariantViolated` if any fails."""
        checks = tuple(checks)
        self.tally.checks += len(checks)
        self.tally.invariants.update(c.__name__ for c in checks)
        found = violations(checks, subject)
        if found:
            raise InvariantViolated(found)

    def violated(self, invariant: str, detail: str, request: Hashable | None = None) -> NoReturn:
        """Fail a property the machine itself checks (progress, every request ending once)."""
        raise InvariantViolated([Violation(invariant, detail, request=request)])

    @invariant()
    def count_step(self) -> None:
        """Runs after the initialization and after every rule: the run's step count."""
        self.tally.steps += 1

    @classmethod
    def with_initial(cls, rule: str, **strategies: SearchStrategy) -> type[InvariantMachine]:
        """A subclass, of the same name, whose ``@initialize`` rule ``rule`` draws its
        arguments from ``strategies`` instead: how ``pagedkv check --config`` pins a
        machine to one engine configuration. Hypothesis prints the drawn arguments in a
        reproduction, so it runs unchanged on ``cls`` itself."""
        base = getattr(cls, rule)

        def init(self: InvariantMachine, **kwargs: object) -> None:
            base(self, **kwargs)

        init.__name__ = init.__qualname__ = rule
        # (typed loosely: mypy matches **strategies against initialize's target/targets overloads)
        decorate: Callable[..., Callable[[Callable[..., None]], Callable[..., None]]] = initialize
        return type(cls.__name__, (cls,), {rule: decorate(**strategies)(init), "__module__": cls.__module__})
