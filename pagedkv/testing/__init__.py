"""Property-testing the allocator and the scheduler: the invariant catalogue, hypothesis
strategies, and the state machines behind ``pagedkv check``, for your own configuration,
admission policy or eviction choice (``docs/invariants.md``).

Built on hypothesis, a run-time dependency of pagedkv (``docs/dependencies.md`` says why).

- :mod:`pagedkv.testing.invariants`: every invariant as a named check returning a :class:`Violation`;
- :mod:`pagedkv.testing.strategies` and :mod:`pagedkv.testing.operations`: inputs and operation sequences;
- the machines: :class:`KVManagerMachine` (pool and tables), :class:`PrefixCacheMachine` (prefix caching,
  forks, swap) and :class:`SchedulerMachine` (aborts, priorities, preemption), each subclassable;
- :func:`run_machine`: run one with a budget and get a :class:`MachineReport`;
- :class:`ContentExecutor`: a stand-in model that checks every token of every context it reads.
"""

from pagedkv.paged.invariants import Violation
from pagedkv.testing.executor import ContentExecutor
from pagedkv.testing.machine import InvariantMachine, InvariantViolated
from pagedkv.testing.pool_machine import KVManagerMachine
from pagedkv.testing.prefix_machine import PrefixCacheMachine
from pagedkv.testing.runner import MachineReport, run_machine
from pagedkv.testing.scheduler_machine import SchedulerMachine

__all__ = [
    "ContentExecutor",
    "InvariantMachine",
    "InvariantViolated",
    "KVManagerMachine",
    "MachineReport",
    "PrefixCacheMachine",
    "SchedulerMachine",
    "Violation",
    "run_machine",
]
