"""The scheduler under random pressure: adds (priorities, n > 1, shared prefixes), aborts in
any state, and steps, over random engine configurations with tiny pools, so that requests
are preempted by swap and by recompute, forked, and served from the prefix cache. A
:class:`~pagedkv.testing.executor.ContentExecutor` checks every token of every context.

Plug in your own admission policy by overriding :meth:`SchedulerMachine.admission`, or
build the engine yourself in :meth:`SchedulerMachine.make_engine`; pin the configuration
with ``SchedulerMachine.with_initial("setup", config=st.just(config))``.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from pagedkv.errors import InvalidRequestError
from pagedkv.paged.invariants import KV_CHECKS, POOL_CHECKS, SWAP_CHECKS, pool_is_whole
from pagedkv.scheduler import AdmissionPolicy, EngineConfig, LLMEngine, SamplingParams
from pagedkv.scheduler.invariants import SCHEDULER_CHECKS
from pagedkv.testing.executor import ContentExecutor
from pagedkv.testing.machine import InvariantMachine
from pagedkv.testing.pool_machine import PICK
from pagedkv.testing.strategies import RequestSpec, engine_configs, requests

MAX_LEN = 40
"""Longest prompt + output (the context length); the drawn pools hold a few blocks fewer or
more than such a request needs."""
DRAIN_STEPS = 5000
"""Steps a run may take to finish every request at its end before it counts as stuck."""


class SchedulerMachine(InvariantMachine):
    coverage: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self._engine: LLMEngine | None = None  # made by setup, the first rule
        self.executor = ContentExecutor(max_model_len=MAX_LEN)
        self.next_id = 0
        self.added: set[str] = set()
        self.ended: set[str] = set()

    # ------------------------------------------------------------ for subclasses

    def admission(self) -> AdmissionPolicy | None:
        """The admission policy under test (``None``: the engine's own)."""
        return None

    def make_engine(self, executor: ContentExecutor, config: EngineConfig) -> LLMEngine:
        """The engine under test, on ``executor``; its clock counts steps."""
        return LLMEngine(executor, config, clock=lambda: float(executor.plans), admission=self.admission())

    # ------------------------------------------------------------ rules

    @property
    def engine(self) -> LLMEngine:
        assert self._engine is not None, "setup runs first"
        return self._engine

    @initialize(config=engine_configs(MAX_LEN))
    def setup(self, config: EngineConfig) -> None:
        self.config = config
        self._engine = self.make_engine(self.executor, config)

    @rule(request=requests(MAX_LEN, max_n=6))
    def add(self, request: RequestSpec) -> None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        params = request.params.model_copy(update={"n": min(request.params.n, self.config.max_num_seqs)})
        try:
            self.engine.add_request(rid, request.prompt, params, priority=request.priority)
        except InvalidRequestError:
            self.coverage["refused"] += 1  # the admission policy said it could never run this one
            return
        self.added.add(rid)

    @precondition(lambda self: self._engine is not None)
    @rule(prompt_len=st.integers(1, MAX_LEN))
    def add_never_fitting(self, prompt_len: int) -> None:
        """A request whose longest context needs one block more than the whole pool is
        refused when it is added; accepted, it would wait (or thrash) forever."""
        kv = self.engine.kv_manager
        total = kv.num_blocks * kv.block_size + 2  # its last token needs no slot: total - 1 slots
        if total > MAX_LEN:
            return  # refused for its length anyway
        prompt = [3] * min(prompt_len, total - 1)
        params = SamplingParams(max_tokens=total - len(prompt), ignore_eos=True)
        try:
            self.engine.add_request(f"too-big-{self.next_id}", prompt, params)
        except InvalidRequestError:
            self.coverage["refused-never-fitting"] += 1
            return
        self.violated("never_fitting_requests_refused", f"needs {kv.num_blocks + 1} blocks of {kv.num_blocks}",
                      f"too-big-{self.next_id}")

    @precondition(lambda self: self._engine is not None and self._engine.has_unfinished_requests())
    @rule(pick=PICK)
    def abort(self, pick: int) -> None:
        live = sorted(self.engine.scheduler.requests)
        self.engine.abort(live[pick % len(live)])

    @precondition(lambda self: self._engine is not None)
    @rule()
    def step(self) -> None:
        busy = self.engine.has_unfinished_requests()
        plans_before, empty_before = self.executor.plans, self.executor.empty_plans
        for out in self.engine.step():
            if out.finished:
                if out.request_id in self.ended:
                    self.violated("every_request_ends_once", "ended twice", out.request_id)
                self.ended.add(out.request_id)
        assert self.executor.plans == plans_before + 1
        if busy and self.executor.empty_plans > empty_before:
            waiting = len(self.engine.scheduler.requests)
            self.violated("every_step_makes_progress", f"a step scheduled nothing while {waiting} request(s) waited")
        stats = self.engine.stats()
        self.coverage.update(
            swapped=stats.num_swapped_out > 0, recomputed=stats.num_recomputed > 0, forked=stats.num_running > 1
            and any(len(r.group) > 1 for r in self.engine.scheduler.requests.values()),
            prefix_hit=stats.num_prefix_hit_tokens > 0, unchunked=not self.config.enable_chunked_prefill,
        )

    # ------------------------------------------------------------ invariants

    @invariant()
    def limits_hold(self) -> None:
        """The token budget and ``max_num_seqs`` hold in every step's plan."""
        if self._engine is None:
            return
        assert self.executor.max_batched_tokens <= self.config.max_num_batched_tokens, "over the token budget"
        assert self.executor.max_scheduled <= self.config.max_num_seqs, "more sequences scheduled than max_num_seqs"

    @invariant()
    def catalogue_holds(self) -> None:
        if self._engine is None:
            return
        kv = self.engine.kv_manager
        self.expect(SCHEDULER_CHECKS, self.engine.scheduler)
        self.expect(POOL_CHECKS, kv.pool)
        self.expect(SWAP_CHECKS, kv.swap)
        self.expect(KV_CHECKS, kv)

    def teardown(self) -> None:
        """Every request ends, none twice and none lost, and the pool is whole again."""
        if self._engine is None:
            return
        for _ in range(DRAIN_STEPS):
            if not self.engine.has_unfinished_requests():
                break
            self.step()
        if self.engine.has_unfinished_requests():
            stuck = sorted(self.engine.scheduler.requests)
            self.violated("every_request_ends", f"{len(stuck)} unfinished after {DRAIN_STEPS} steps", stuck[0])
        self.step()  # delivers the final outputs of the last aborts
        lost = self.added - self.ended
        if lost:
            self.violated("every_request_ends", "never ended", min(lost))
        self.expect([pool_is_whole, *KV_CHECKS], self.engine.kv_manager)
