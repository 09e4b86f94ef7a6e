"""The invariant catalogue: every named check, by what it checks.

Each check takes the object it checks and returns a :class:`Violation` (the invariant's
name, what is wrong, the offending block or request) or ``None``. The bookkeeping's own
checks live in :mod:`pagedkv.paged.invariants`, beside the classes whose ``check()``
methods run them; they are collected here with the scheduler's. ``docs/invariants.md``
says why each matters and which class of bug it stops.
"""

from __future__ import annotations

from pagedkv.paged.invariants import (
    KV_CHECKS,
    POOL_CHECKS,
    SWAP_CHECKS,
    Check,
    Violation,
    cached_blocks_hold_their_keys,
    free_plus_used_is_total,
    free_xor_referenced,
    kv_violations,
    pool_is_whole,
    prefix_index_matches_keys,
    ref_count_is_number_of_holders,
    resident_xor_swapped,
    stored_tokens_add_up,
    swap_blocks_partitioned,
    tables_fit_their_tokens,
    violations,
)
from pagedkv.scheduler.invariants import (
    SCHEDULER_CHECKS,
    no_orphan_blocks,
    one_queue_per_sequence,
    queues_sorted_by_rank,
    running_hold_their_context,
    seats_within_limit,
    waiting_hold_no_blocks,
)

__all__ = [
    "KV_CHECKS",
    "POOL_CHECKS",
    "SCHEDULER_CHECKS",
    "SWAP_CHECKS",
    "Check",
    "Violation",
    "cached_blocks_hold_their_keys",
    "free_plus_used_is_total",
    "free_xor_referenced",
    "kv_violations",
    "no_orphan_blocks",
    "one_queue_per_sequence",
    "pool_is_whole",
    "prefix_index_matches_keys",
    "queues_sorted_by_rank",
    "ref_count_is_number_of_holders",
    "resident_xor_swapped",
    "running_hold_their_context",
    "seats_within_limit",
    "stored_tokens_add_up",
    "swap_blocks_partitioned",
    "tables_fit_their_tokens",
    "violations",
    "waiting_hold_no_blocks",
]
