"""Admission policies: the scheduler's declared extension point for who may start.

The scheduler always applies its own rules (seats, the token budget, blocks, the
watermark, the head-of-line patience). An :class:`AdmissionPolicy` narrows them: the
engine ships :class:`PagedAdmission`, which adds nothing (blocks are taken as tokens
arrive); the simulator's baselines (``pagedkv.sim.policies``) reserve each request's
whole length up front or admit static batches, through this same interface.

The scheduler calls a policy at fixed points and nowhere else:

- ``bind`` once, with the KV manager and context length it serves;
- ``check_fits`` when a request is added (raise to refuse it);
- ``begin_step`` / ``end_step`` around every ``schedule()`` (``end_step`` may add work
  the plan does not schedule, such as a static batch's padding rows);
- ``admission_open`` before admitting waiting requests in a step;
- ``claim`` before a sequence is given a chunk (refusing means "not now"), and
  ``release`` when it leaves: finished, preempted, or a fresh admission that failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pagedkv.paged.kv_manager import KVCacheManager
from pagedkv.scheduler.plan import SchedulerOutput
from pagedkv.scheduler.request import Request


class AdmissionPolicy(Protocol):
    @property
    def takes_decode_runs(self) -> bool:
        """Whether pure decode steps may be taken in bulk (:mod:`pagedkv.scheduler.decode_run`):
        no, when ``end_step`` changes what a step computes."""

    def bind(self, kv: KVCacheManager, max_model_len: int) -> None: ...

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise :class:`pagedkv.InvalidRequestError` if this policy could never admit a
        request of this size."""

    def begin_step(self, running: Sequence[Request]) -> None: ...

    def admission_open(self) -> bool: ...

    def claim(self, request: Request) -> bool:
        """Whether ``request`` (a sequence) may be given a chunk now; hold what it needs."""

    def release(self, request: Request) -> None:
        """Give back what ``request`` holds, if anything (idempotent)."""

    def end_step(self, plan: SchedulerOutput, running: Sequence[Request]) -> None: ...


class PagedAdmission:
    """The engine's policy: nothing beyond the scheduler's own rules."""

    takes_decode_runs = True

    def bind(self, kv: KVCacheManager, max_model_len: int) -> None:
        pass

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        pass

    def begin_step(self, running: Sequence[Request]) -> None:
        pass

    def admission_open(self) -> bool:
        return True

    def claim(self, request: Request) -> bool:
        return True

    def release(self, request: Request) -> None:
        pass

    def end_step(self, plan: SchedulerOutput, running: Sequence[Request]) -> None:
        pass
