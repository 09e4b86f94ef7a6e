"""The memory and batching policies the simulator compares.

``paged`` is the engine as it ships. The others are baselines built on the same scheduler
by overriding two of its hooks, so that every policy shares the same step loop:

- ``reserve-max-tokens``: continuous batching, but each request reserves prompt +
  max_tokens slots when admitted (Orca with a perfect length oracle);
- ``reserve-max-len``: the same, reserving the model's whole context (Orca "max");
- ``static``: static batching with max-length reservations (FasterTransformer): a batch
  is admitted only when the previous one has fully drained, and sequences that finish
  early keep being computed (as padding) until the batch ends.

Reservations are accounted in token slots on top of a paged pool of 1-token blocks, which
stands for a perfectly compacting contiguous allocator: it shows reservation waste and
ignores external fragmentation, so the baselines come out better than real ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Literal

from pagedkv.errors import InvalidRequestError
from pagedkv.paged.kv_manager import KVCacheManager
from pagedkv.scheduler.config import EngineConfig
from pagedkv.scheduler.plan import SchedulerOutput
from pagedkv.scheduler.request import FinishReason, Request
from pagedkv.scheduler.scheduler import Scheduler

Policy = Literal["paged", "reserve-max-tokens", "reserve-max-len", "static"]
POLICIES: tuple[Policy, ...] = ("paged", "reserve-max-tokens", "reserve-max-len", "static")
Reserve = Literal["max_tokens", "max_model_len"]


class ReservingScheduler(Scheduler):
    """Admit a request only when its whole reservation fits next to the others'."""

    def __init__(
        self,
        config: EngineConfig,
        kv: KVCacheManager,
        max_model_len: int,
        eos_token_id: int | None,
        clock: Callable[[], float] = time.monotonic,
        *,
        reserve: Reserve,
    ) -> None:
        super().__init__(config, kv, max_model_len, eos_token_id, clock)
        self.reserve = reserve
        self.reserved_slots = 0
        self._holdings: dict[Hashable, int] = {}  # slots reserved, per sequence

    @property
    def capacity(self) -> int:
        return self.kv.num_blocks * self.kv.block_size

    def reservation(self, num_prompt_tokens: int, max_tokens: int) -> int:
        return self.max_model_len if self.reserve == "max_model_len" else num_prompt_tokens + max_tokens

    def check_fits(self, request_id: str, num_prompt_tokens: int, max_tokens: int) -> None:
        super().check_fits(request_id, num_prompt_tokens, max_tokens)
        need = self.reservation(num_prompt_tokens, max_tokens)
        if need > self.capacity:
            raise InvalidRequestError(f"a reservation of {need} slots can never fit a pool of {self.capacity}")

    def _try_schedule(
        self, request: Request, budget: int, plan: SchedulerOutput, reserve: int = 0, whole: bool = False
    ) -> int:
        rid = request.seq_id
        if rid not in self._holdings:
            need = self.reservation(request.num_prompt_tokens, request.params.max_tokens)
            if self.reserved_slots + need > self.capacity:
                return 0
            self._holdings[rid] = need
            self.reserved_slots += need
        n = super()._try_schedule(request, budget, plan, reserve, whole)
        if not n and not self.kv.has(rid):  # a fresh admission that failed: give the reservation back
            self.reserved_slots -= self._holdings.pop(rid)
        return n

    def _finish(self, request: Request, reason: FinishReason, now: float) -> None:
        self.reserved_slots -= self._holdings.pop(request.seq_id, 0)
        super()._finish(request, reason, now)

    def _preempt_lowest(self, plan: SchedulerOutput) -> Request:
        request = super()._preempt_lowest(plan)
        self.reserved_slots -= self._holdings.pop(request.seq_id, 0)
        return request


class StaticBatchScheduler(ReservingScheduler):
    """FasterTransformer-style static batches with max-length reservations."""

    def __init__(
        self,
        config: EngineConfig,
        kv: KVCacheManager,
        max_model_len: int,
        eos_token_id: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(config, kv, max_model_len, eos_token_id, clock, reserve="max_model_len")
        self._batch_open = True
        self._batch_size = 0

    def schedule(self) -> SchedulerOutput:
        self._batch_open = not self.running  # the previous batch has drained
        plan = super().schedule()
        if self._batch_open:
            self._batch_size = len(self.running)
        padding = self._batch_size - len(plan.scheduled) if self.running else 0
        plan.num_batched_tokens += padding  # finished rows are still computed
        plan.num_single_token_seqs += padding
        plan.num_samples += padding
        return plan

    def decode_run(self, token: int) -> None:
        return None  # its steps also compute the finished rows of the batch (padding)

    def _admission_open(self, plan: SchedulerOutput) -> bool:
        return self._batch_open and super()._admission_open(plan)


def build_scheduler(
    policy: Policy, config: EngineConfig, kv: KVCacheManager, max_model_len: int, clock: Callable[[], float]
) -> Scheduler:
    if policy == "paged":
        return Scheduler(config, kv, max_model_len, None, clock)
    if policy == "static":
        return StaticBatchScheduler(config, kv, max_model_len, None, clock)
    reserve: Reserve = "max_tokens" if policy == "reserve-max-tokens" else "max_model_len"
    return ReservingScheduler(config, kv, max_model_len, None, clock, reserve=reserve)


def reserved_slots(scheduler: Scheduler) -> int:
    """Token slots the policy holds back: whole blocks when paged, reservations otherwise."""
    if isinstance(scheduler, ReservingScheduler):
        return scheduler.reserved_slots
    return scheduler.kv.num_reserved_slots


def reserved_slots_during(scheduler: Scheduler, before: int, blocks_used: list[int]) -> list[int]:
    """:func:`reserved_slots` during each step of a ``scheduler.DecodeRun`` that started
    with ``before``, given the blocks in use during each: reservations stay as they are
    (a request hands its back when it finishes, after the step); blocks are taken."""
    if isinstance(scheduler, ReservingScheduler):
        return [before] * len(blocks_used)
    return [b * scheduler.kv.block_size for b in blocks_used]
