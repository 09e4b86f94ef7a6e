"""The memory and batching policies the simulator compares.

``paged`` is the engine as it ships. The others are baselines built on the same scheduler
as admission policies (``scheduler.admission.AdmissionPolicy``), so that every policy
shares the same step loop:

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

from collections.abc import Hashable, Sequence
from typing import Literal

from pagedkv.errors import InvalidRequestError
from pagedkv.paged.kv_manager import KVCacheManager
from pagedkv.scheduler.admission import AdmissionPolicy, PagedAdmission
from pagedkv.scheduler.plan import SchedulerOutput
from pagedkv.scheduler.request import Request
from pagedkv.scheduler.scheduler import Scheduler

Policy = Literal["paged", "reserve-max-tokens", "reserve-max-len", "static"]
POLICIES: tuple[Policy, ...] = ("paged", "reserve-max-tokens", "reserve-max-len", "static")
Reserve = Literal["max_tokens", "max_model_len"]


class ReservingAdmission(PagedAdmission):
    """Admit a request only when its whole reservation fits next to the others'."""

    def __init__(self, reserve: Reserve) -> None:
        self.reserve = reserve
        self.reserved_slots = 0
        self.capacity = 0
        self.max_model_len = 0
        self._holdings: dict[Hashable, int] = {}  # slots reserved, per sequence

    def bind(self, kv: KVCacheManager, max_model_len: int) -> None:
        self.capacity = kv.num_blocks * kv.block_size
        self.max_model_len = max_model_len

    def reservation(self, num_prompt_tokens: int, max_tokens: int) -> int:
        return self.max_model_len if self.reserve == "max_model_len" else num_prompt_tokens + max_tokens

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        need = self.reservation(num_prompt_tokens, max_tokens)
        if need > self.capacity:
            raise InvalidRequestError(f"a reservation of {need} slots can never fit a pool of {self.capacity}")

    def claim(self, request: Request) -> bool:
        rid = request.seq_id
        if rid not in self._holdings:
            need = self.reservation(request.num_prompt_tokens, request.params.max_tokens)
            if self.reserved_slots + need > self.capacity:
                return False
            self._holdings[rid] = need
            self.reserved_slots += need
        return True

    def release(self, request: Request) -> None:
        self.reserved_slots -= self._holdings.pop(request.seq_id, 0)


class StaticBatchAdmission(ReservingAdmission):
    """FasterTransformer-style static batches with max-length reservations."""

    takes_decode_runs = False  # its steps also compute the finished rows of the batch (padding)

    def __init__(self) -> None:
        super().__init__("max_model_len")
        self._batch_open = True
        self._batch_size = 0

    def begin_step(self, running: Sequence[Request]) -> None:
        self._batch_open = not running  # the previous batch has drained

    def admission_open(self) -> bool:
        return self._batch_open

    def end_step(self, plan: SchedulerOutput, running: Sequence[Request]) -> None:
        if self._batch_open:
            self._batch_size = len(running)
        padding = self._batch_size - len(plan.scheduled) if running else 0
        plan.num_batched_tokens += padding  # finished rows are still computed
        plan.num_single_token_seqs += padding
        plan.num_samples += padding


def admission_policy(policy: Policy) -> AdmissionPolicy:
    """The scheduler's admission policy for ``policy``."""
    if policy == "paged":
        return PagedAdmission()
    if policy == "static":
        return StaticBatchAdmission()
    return ReservingAdmission("max_tokens" if policy == "reserve-max-tokens" else "max_model_len")


def reserved_slots(scheduler: Scheduler) -> int:
    """Token slots the policy holds back: whole blocks when paged, reservations otherwise."""
    if isinstance(scheduler.admission, ReservingAdmission):
        return scheduler.admission.reserved_slots
    return scheduler.kv.num_reserved_slots


def reserved_slots_during(scheduler: Scheduler, before: int, blocks_used: list[int]) -> list[int]:
    """:func:`reserved_slots` during each step of a ``scheduler.DecodeRun`` that started
    with ``before``, given the blocks in use during each: reservations stay as they are
    (a request hands its back when it finishes, after the step); blocks are taken."""
    if isinstance(scheduler.admission, ReservingAdmission):
        return [before] * len(blocks_used)
    return [b * scheduler.kv.block_size for b in blocks_used]
