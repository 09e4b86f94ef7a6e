"""Property-testing the allocator and the scheduler: the invariant catalogue, hypothesis
strategies, and the state machines behind ``pagedkv check``, for your own configuration,
admission policy or eviction choice (``docs/invariants.md``).

Needs hypothesis (``pip install "pagedkv[testing]"``).

- :mod:`pagedkv.testing.invariants`: every invariant as a named check returning a :class:`Violation`;
- :mod:`pagedkv.testing.strategies` and :mod:`pagedkv.testing.operations`: inputs and operation sequences;
- the machines: :class:`KVManagerMachine` (pool and tables), :class:`PrefixCacheMachine` (prefix caching,
  forks, swap) and :class:`SchedulerMachine` (aborts, priorities, preemption), each subclassable;
- :func:`run_machine`: run one with a budget and get a :class:`MachineReport`.
"""

from pagedkv.paged.invariants import Violation
from pagedkv.testing.machine import InvariantMachine, InvariantViolated
from pagedkv.testing.pool_machine import KVManagerMachine
from pagedkv.testing.prefix_machine import PrefixCacheMachine
from pagedkv.testing.runner import MachineReport, run_machine

__all__ = [
    "InvariantMachine",
    "InvariantViolated",
    "KVManagerMachine",
    "MachineReport",
    "PrefixCacheMachine",
    "Violation",
    "run_machine",
]
