"""The bookkeeping's invariants, one named check each, over a :class:`BlockPool`, a
:class:`SwapSpace` or a :class:`KVCacheManager`.

Each check returns the first :class:`Violation` it finds (which invariant, what is wrong,
and the offending block or sequence) or ``None``. They read only the objects' public
views (``snapshot()``, ``seq_ids()``, ``table()``), so they see exactly what a caller can.
They live here, beside what they check and free of torch and hypothesis, because the
classes' own ``check()`` methods run them (the simulator at the end of a run, the tests);
the scheduler's are in ``pagedkv.scheduler.invariants``; ``pagedkv.testing`` collects the
catalogue and adds the state machines that drive them all (``docs/invariants.md``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from pagedkv.paged.block_table import blocks_for
from pagedkv.paged.prefix import block_hash, root_hash

if TYPE_CHECKING:
    from pagedkv.paged.block_pool import BlockPool
    from pagedkv.paged.kv_manager import KVCacheManager
    from pagedkv.paged.swap import SwapSpace

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant: its name (the check's function name), what is wrong, and the
    block or sequence/request it concerns, when one does."""

    invariant: str
    detail: str
    block: int | None = None
    request: Hashable | None = None

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


Check = Callable[[T], "Violation | None"]


class InvariantViolation(RuntimeError):
    """Raised by the debug mode (``EngineConfig.check_invariants``) at the first step after
    which an invariant fails: a bug in the bookkeeping, never a user error."""

    def __init__(self, step: int, found: list[Violation]) -> None:
        super().__init__(f"after step {step}: " + "; ".join(str(v) for v in found))
        self.step = step
        self.violations = found


def violations(checks: Iterable[Check[T]], subject: T) -> list[Violation]:
    """Every violation the checks find in ``subject`` (empty: all hold)."""
    return [v for check in checks if (v := check(subject)) is not None]


# ---- the pool ----------------------------------------------------------------------------


def free_xor_referenced(pool: BlockPool) -> Violation | None:
    """Every block is in the free queue (once) exactly when its ref count is 0, and no ref
    count is negative. Else a block could be handed out while someone holds it (two
    sequences writing one page), or never be handed out again (a leak)."""
    snap = pool.snapshot()
    free = Counter(snap.free_order)
    for b, rc in enumerate(snap.ref_counts):
        if rc < 0 or (rc == 0) != (free[b] == 1):
            return Violation("free_xor_referenced", f"block {b}: ref count {rc}, {free[b]}x in the free queue", b)
    stray = set(free) - set(range(pool.num_blocks))
    if stray:
        return Violation("free_xor_referenced", f"unknown blocks {sorted(stray)} in the free queue", min(stray))
    return None


def free_plus_used_is_total(pool: BlockPool) -> Violation | None:
    """``num_free + num_used == num_blocks``, where used means ref count >= 1. The counters
    admission and the stats read must agree with the blocks themselves (an accounting
    double count admits into memory that is not there, or starves on memory that is)."""
    used = sum(1 for rc in pool.snapshot().ref_counts if rc > 0)
    if pool.num_used != used or pool.num_free + used != pool.num_blocks:
        return Violation(
            "free_plus_used_is_total",
            f"{pool.num_free} free + {used} referenced != {pool.num_blocks} blocks (num_used says {pool.num_used})",
        )
    return None


def prefix_index_matches_keys(pool: BlockPool) -> Violation | None:
    """Every prefix-index entry maps a hash to a block whose recorded key is that hash, and
    every recorded key has its entry. A stale entry serves a reused block's new contents
    as some old prefix's K/V."""
    snap = pool.snapshot()
    keys = {b: key[0] for b, key in snap.cached}
    index = dict(snap.prefix_index)
    for h, b in index.items():
        if keys.get(b) != h:
            return Violation("prefix_index_matches_keys", f"the index maps a hash to block {b}, which has another", b)
    if len(keys) != len(index):
        orphan = min(set(keys) - set(index.values()), default=None)
        return Violation("prefix_index_matches_keys", f"{len(keys)} keyed blocks, {len(index)} index entries", orphan)
    return None


POOL_CHECKS: tuple[Check[BlockPool], ...] = (free_xor_referenced, free_plus_used_is_total, prefix_index_matches_keys)


# ---- the swap space ------------------------------------------------------------------------


def swap_blocks_partitioned(swap: SwapSpace) -> Violation | None:
    """Every CPU swap block is free xor held by exactly one swapped-out sequence. Else a
    swap-in reads another sequence's K/V, or the swap space shrinks for good (a swap-in
    that does not free its swap blocks)."""
    held = Counter(b for s in swap.seq_ids() for b in swap.table(s).blocks)
    everything = held + Counter(swap.free_blocks)
    for b, times in sorted(everything.items()):
        if times != 1 or not 0 <= b < swap.num_blocks:
            return Violation("swap_blocks_partitioned", f"swap block {b} is free or held {times} times", b)
    if len(everything) != swap.num_blocks:
        return Violation("swap_blocks_partitioned", f"{len(everything)} of {swap.num_blocks} swap blocks accounted for")
    return None


SWAP_CHECKS: tuple[Check[SwapSpace], ...] = (swap_blocks_partitioned,)


# ---- the manager: tables over the pool ----------------------------------------------------------


def ref_count_is_number_of_holders(kv: KVCacheManager) -> Violation | None:
    """A block's ref count equals the number of block tables holding it. One too many is a
    leak (the block never comes back); one too few frees a block someone still reads,
    which then gets handed out twice (duplicate blocks)."""
    holders = Counter(b for s in kv.seq_ids() for b in kv.block_ids(s))
    for b, rc in enumerate(kv.pool.snapshot().ref_counts):
        if rc != holders[b]:
            return Violation("ref_count_is_number_of_holders", f"block {b}: ref count {rc}, {holders[b]} holder(s)", b)
    return None


def tables_fit_their_tokens(kv: KVCacheManager) -> Violation | None:
    """A table of ``n`` tokens holds ``ceil(n / block_size)`` blocks, and only its full
    blocks carry prefix-cache keys. An off-by-one here either writes past the last
    block or holds a block for nothing."""
    for s in kv.seq_ids():
        t = kv.table(s)
        if len(t.blocks) != blocks_for(t.num_tokens, kv.block_size):
            return Violation("tables_fit_their_tokens", f"{len(t.blocks)} blocks for {t.num_tokens} tokens", request=s)
        if len(t.hashes) > t.num_tokens // kv.block_size:
            return Violation("tables_fit_their_tokens", "a partially filled block has a prefix-cache key", request=s)
    return None


def stored_tokens_add_up(kv: KVCacheManager) -> Violation | None:
    """``num_stored_tokens`` is the sum of the tables' tokens: the running count the
    stats report must not drift (a double count on one path)."""
    total = sum(kv.table(s).num_tokens for s in kv.seq_ids())
    if kv.num_stored_tokens != total:
        return Violation("stored_tokens_add_up", f"num_stored_tokens {kv.num_stored_tokens}, tables hold {total}")
    return None


def resident_xor_swapped(kv: KVCacheManager) -> Violation | None:
    """No sequence has both a device table and swap blocks: its K/V lives in one place."""
    both = [s for s in kv.seq_ids() if kv.swap.has(s)]
    if both:
        return Violation("resident_xor_swapped", "both resident and swapped out", request=both[0])
    return None


KV_CHECKS: tuple[Check[KVCacheManager], ...] = (
    ref_count_is_number_of_holders, tables_fit_their_tokens, stored_tokens_add_up, resident_xor_swapped,
)


def kv_violations(kv: KVCacheManager) -> list[Violation]:
    """Every violation in the manager: its pool's, its swap space's, and its tables'."""
    return violations(POOL_CHECKS, kv.pool) + violations(SWAP_CHECKS, kv.swap) + violations(KV_CHECKS, kv)


def pool_is_whole(kv: KVCacheManager) -> Violation | None:
    """With no table and nothing swapped out, every block and swap block is free: what the
    pool looks like after every sequence is finished, aborted or preempted, in any order
    and state. Checked when a run ends (leaks on abort show here)."""
    left = [*kv.seq_ids(), *kv.swap.seq_ids()]
    if left:
        return Violation("pool_is_whole", f"{len(left)} sequence(s) still hold blocks", request=left[0])
    held = [b for b, rc in enumerate(kv.pool.snapshot().ref_counts) if rc]
    if held or kv.num_free_blocks != kv.num_blocks or kv.swap.num_free != kv.swap.num_blocks:
        block = held[0] if held else None
        return Violation("pool_is_whole", f"blocks {held} still referenced, or the free counts fall short", block)
    return None


def cached_blocks_hold_their_keys(
    contents: Callable[[int], Sequence[int] | None], salt: bytes = b""
) -> Check[KVCacheManager]:
    """The check that every block in the prefix index holds the K/V its key names, given a
    stand-in for the cache: ``contents(b)`` is the token prefix whose K/V block ``b``
    holds through its last slot (``None``: unknown). Catches stale prefix entries: a
    block reused, overwritten, copied or swapped while its old entry stayed."""

    def check(kv: KVCacheManager) -> Violation | None:
        bs = kv.block_size
        for b, (key, tokens) in kv.pool.snapshot().cached:
            prefix = contents(b)
            if prefix is None or tuple(prefix[-bs:]) != tokens:
                return Violation(check.__name__, f"holds {prefix}, its key says ...{list(tokens)}", b)
            parent = root_hash(salt)
            for i in range(len(prefix) // bs):
                parent = block_hash(parent, prefix[i * bs:(i + 1) * bs])
            if parent != key:
                return Violation(check.__name__, f"holds {list(prefix)}, under another prefix's key", b)
        return None

    check.__name__ = check.__qualname__ = "cached_blocks_hold_their_keys"
    check.__doc__ = cached_blocks_hold_their_keys.__doc__
    return check
