"""A fleet: N replicas of one engine config behind a router, each replica the real scheduler
and KV manager on a virtual clock of its own.

Time advances as a discrete-event simulation: the next event is either the next arrival or
the next step of the busy replica whose clock is furthest behind. An arrival is routed with
the replicas as they stand at that moment (one in the middle of a long step has not
finished it yet: it takes the request into its queue for its next step), and an idle
replica's clock jumps to the arrival. Runs of pure decode steps are still taken in bulk, up
to the next arrival, so a fleet costs about what its replicas would cost alone.

Routers (``Router``):
- ``round-robin``: request i to replica i mod N.
- ``least-outstanding``: to the replica with the fewest unfinished requests (the lowest
  index on a tie).
- ``prefix-aware``: requests whose first ``PREFIX_MATCH_TOKENS`` prompt tokens were seen
  before go where those went, so their prefix is in that replica's cache, unless it holds
  more than ``LOAD_FACTOR`` times the fleet's mean outstanding requests plus ``LOAD_SLACK``;
  then (and for new prefixes) to the least outstanding one, which becomes the prefix's home.
  This is the shape of SGLang's cache-aware router (cache affinity with a load bound), keyed
  on a fixed-length prefix instead of a radix tree.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from pagedkv.scheduler.config import EngineConfig
from pagedkv.scheduler.outputs import EngineStats
from pagedkv.sim.cost_model import CostModel
from pagedkv.sim.driver import Replica, RunResult, StepRecords
from pagedkv.sim.executor import SimulatedExecutor, VirtualClock
from pagedkv.sim.policies import Policy
from pagedkv.sim.workload import RequestSpec

Router = Literal["round-robin", "least-outstanding", "prefix-aware"]
ROUTERS: tuple[Router, ...] = ("round-robin", "least-outstanding", "prefix-aware")
PREFIX_MATCH_TOKENS = 64
LOAD_FACTOR = 1.5
LOAD_SLACK = 4


class Routing(Protocol):
    def choose(self, index: int, spec: RequestSpec, replicas: Sequence[Replica]) -> int:
        """The replica (by position) the workload's ``index``-th request goes to."""


class RoundRobin:
    def choose(self, index: int, spec: RequestSpec, replicas: Sequence[Replica]) -> int:
        return index % len(replicas)


def least_outstanding(replicas: Sequence[Replica]) -> int:
    return min(range(len(replicas)), key=lambda i: replicas[i].outstanding)


class LeastOutstanding:
    def choose(self, index: int, spec: RequestSpec, replicas: Sequence[Replica]) -> int:
        return least_outstanding(replicas)


class PrefixAware:
    def __init__(self) -> None:
        self.home: dict[tuple[int, ...], int] = {}  # a prefix's replica

    def choose(self, index: int, spec: RequestSpec, replicas: Sequence[Replica]) -> int:
        if spec.prompt_token_ids is None:  # lengths only: no prefix to follow
            return least_outstanding(replicas)
        key = spec.prompt_token_ids[:PREFIX_MATCH_TOKENS]
        home = self.home.get(key)
        mean = sum(r.outstanding for r in replicas) / len(replicas)
        if home is None or replicas[home].outstanding > LOAD_FACTOR * mean + LOAD_SLACK:
            home = self.home[key] = least_outstanding(replicas)
        return home


ROUTINGS: dict[Router, Callable[[], Routing]] = {
    "round-robin": RoundRobin, "least-outstanding": LeastOutstanding, "prefix-aware": PrefixAware,
}


@dataclass
class FleetResult:
    replicas: list[RunResult]
    routed: list[int]
    """Requests sent to each replica (rejected ones included)."""

    def merged(self) -> RunResult:
        """The fleet as one run, for fleet-wide metrics: every replica's requests and steps
        (memory figures then average over the replicas' steps, weighted by time), and their
        engine counters summed (the peak too: an upper bound of the fleet's)."""
        first = self.replicas[0]
        steps = StepRecords()
        for r in self.replicas:
            for column in dataclasses.fields(steps):
                getattr(steps, column.name).extend(getattr(r.steps, column.name))
        stats = [r.stats for r in self.replicas if r.stats is not None]
        total = EngineStats(*(sum(getattr(s, f.name) for s in stats) for f in dataclasses.fields(EngineStats)))
        return RunResult(first.policy, first.block_size, first.capacity_slots,
                         [rec for r in self.replicas for rec in r.records], sum(r.rejected for r in self.replicas),
                         steps, total)


def run_fleet(
    specs: list[RequestSpec],
    config: EngineConfig,
    cost: CostModel,
    replicas: int,
    router: Router = "round-robin",
    policy: Policy = "paged",
    progress: Callable[[int, int], None] | None = None,
) -> FleetResult:
    """Run the open-loop workload ``specs`` (in arrival order) on ``replicas`` simulated
    replicas of ``config`` behind ``router``, to completion. Every request is accounted
    for: per replica, those routed to it equal those finished plus those rejected."""
    clocks = [VirtualClock() for _ in range(replicas)]
    fleet = [Replica(config, SimulatedExecutor(cost, clock), clock, policy) for clock in clocks]
    route = ROUTINGS[router]()
    routed = [0] * replicas
    pending, ids, total, done = deque(specs), itertools.count(), len(specs), 0
    while pending or any(r.busy for r in fleet):
        busy = [r for r in fleet if r.busy]
        behind = min(busy, key=lambda r: r.clock()) if busy else None
        if behind is None or (pending and pending[0].arrival_time <= behind.clock()):
            spec = pending.popleft()  # not empty: nothing busy means something still to arrive
            index = next(ids)
            chosen = route.choose(index, spec, fleet)
            routed[chosen] += 1
            target = fleet[chosen]
            if not target.busy:
                target.clock.wait_until(spec.arrival_time)
            rejected = target.result.rejected
            target.arrive(index, spec, spec.arrival_time)
            done += target.result.rejected - rejected
            continue
        done += len(behind.step(pending[0].arrival_time if pending else float("inf")))
        if progress is not None:
            progress(done, total)
    return FleetResult([r.finish() for r in fleet], routed)
