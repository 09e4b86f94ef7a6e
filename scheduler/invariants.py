"""The scheduler's invariants, one named check each, over a :class:`Scheduler` (its queues,
its requests and the KV manager under them). Like ``pagedkv.paged.invariants``: each
returns a :class:`Violation` naming the offending request, or ``None``; catalogued in
``pagedkv.testing.invariants`` and ``docs/invariants.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedkv.paged.invariants import Check, Violation
from pagedkv.scheduler.request import RequestStatus

if TYPE_CHECKING:
    from pagedkv.scheduler.queues import RequestQueues


def one_queue_per_sequence(s: RequestQueues) -> Violation | None:
    """Every unfinished sequence is in exactly one queue, once, and every queued one is
    unfinished and known by its request. A sequence in two queues is scheduled twice; one
    in none is never scheduled again (a lost request)."""
    live = {id(q): q for r in s.requests.values() for q in r.group if q.status is not RequestStatus.FINISHED}
    queued = [*s.waiting, *s.running]
    seen: set[int] = set()
    for q in queued:
        if id(q) in seen or id(q) not in live:
            return Violation("one_queue_per_sequence", f"queued twice, or {q.status.value}", request=q.seq_id)
        seen.add(id(q))
    lost = [q for key, q in live.items() if key not in seen]
    if lost:
        return Violation("one_queue_per_sequence", "unfinished but in no queue", request=lost[0].seq_id)
    return None


def queues_sorted_by_rank(s: RequestQueues) -> Violation | None:
    """Both queues are in rank order (``arrival + priority * priority_aging_s``): who is
    admitted next and who is preempted first depend on it, and aging is what keeps a low
    priority from starving."""
    for name, queue in (("waiting", s.waiting), ("running", s.running)):
        for a, b in zip(queue, queue[1:], strict=False):
            if b.rank < a.rank:
                return Violation("queues_sorted_by_rank", f"{name} queue out of rank order", request=b.seq_id)
    return None


def running_hold_their_context(s: RequestQueues) -> Violation | None:
    """A running sequence has a block table covering every token it has computed."""
    for q in s.running:
        if not s.kv.has(q.seq_id) or s.kv.table(q.seq_id).num_tokens < q.num_computed_tokens:
            return Violation("running_hold_their_context", "running without slots for its computed tokens",
                             request=q.seq_id)
    return None


def waiting_hold_no_blocks(s: RequestQueues) -> Violation | None:
    """A waiting sequence holds no device blocks; it holds swap blocks exactly when it was
    preempted by swap, and otherwise has computed nothing (it starts over)."""
    for q in s.waiting:
        if s.kv.has(q.seq_id) or s.kv.swap.has(q.seq_id) != q.swapped or not q.swapped and q.num_computed_tokens:
            return Violation("waiting_hold_no_blocks", "waiting with blocks, or progress it cannot have",
                             request=q.seq_id)
    return None


def no_orphan_blocks(s: RequestQueues) -> Violation | None:
    """Every block table and every swapped-out entry belongs to a queued sequence. An
    abort or a finish that misses a path (a swapped-out sequence, a fork) leaves blocks
    that nobody will ever free."""
    queued = {q.seq_id for q in (*s.waiting, *s.running)}
    for seq_id in (*s.kv.seq_ids(), *s.kv.swap.seq_ids()):
        if seq_id not in queued:
            return Violation("no_orphan_blocks", "holds blocks but is in no queue", request=seq_id)
    return None


def seats_within_limit(s: RequestQueues) -> Violation | None:
    """Running sequences plus the forks running requests will make never exceed
    ``max_num_seqs``."""
    if s.num_seats_taken > s.config.max_num_seqs:
        return Violation("seats_within_limit", f"{s.num_seats_taken} seats taken of {s.config.max_num_seqs}")
    return None


SCHEDULER_CHECKS: tuple[Check[RequestQueues], ...] = (
    one_queue_per_sequence, queues_sorted_by_rank, running_hold_their_context, waiting_hold_no_blocks,
    no_orphan_blocks, seats_within_limit,
)
