"""The block pool: which K/V pages exist, who holds them, and which are free.

Pure Python bookkeeping (no torch) so the workload simulator can drive millions of
allocations without touching a tensor.

Invariants (checked by :meth:`BlockPool.check` and by the property tests):

- every block id in ``[0, num_blocks)`` is either free (in the free queue, ref count 0)
  or referenced (ref count >= 1), never both;
- ``num_free + num_used == num_blocks``;
- the free queue holds each free block exactly once.

The free queue is an ``OrderedDict`` used as an O(1) doubly linked list: allocation pops
from the front, freeing appends to the back, so the least recently freed block is reused
first.

Prefix caching lives here too, because eviction is the free queue's order: a full block
whose K/V is computed (or being computed by the current step) can be *registered* under a content hash (see
``pagedkv.paged.prefix``). A registered block that is freed keeps its contents and its index entry
while it waits in the free queue; a later request with the same prefix can :meth:`take` it
back. Only when :meth:`allocate` pops it for someone else (least recently freed first) is
it evicted and its index entry dropped. More invariants:

- every index entry maps a hash to a block whose recorded key is that hash, and back;
- a block's recorded tokens are compared on every lookup, so a hash collision can never
  serve another prefix's K/V.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from pagedkv.paged.invariants import POOL_CHECKS, violations


class BlockPoolError(RuntimeError):
    """A caller broke the pool's contract (double free, unknown id, ...)."""


class PoolSnapshot(NamedTuple):
    """An immutable copy of the pool's state, for atomicity checks in tests."""

    ref_counts: tuple[int, ...]
    free_order: tuple[int, ...]
    cached: tuple[tuple[int, tuple[bytes, tuple[int, ...]]], ...] = ()
    """Each registered block's recorded key: ``(block, (hash, tokens))``, by block."""
    prefix_index: tuple[tuple[bytes, int], ...] = ()
    """The prefix index: ``(hash, block)``, by hash."""


class BlockPool:
    """``num_blocks`` fixed-size K/V pages with reference counts.

    Allocation is all-or-nothing: :meth:`allocate` either returns every block asked for
    or returns ``None`` and changes nothing.
    """

    def __init__(self, num_blocks: int) -> None:
        if type(num_blocks) is not int or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks  # read-only outside this class; a list for O(1) hot-path reads
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # content hash -> block holding that content
        self._keys: dict[int, tuple[bytes, tuple[int, ...]]] = {}  # block -> (hash, its tokens)
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self.ref_counts[block_id]

    def is_shared(self, block_id: int) -> bool:
        """More than one holder (a write into it must copy first). ``block_id`` must be held."""
        return self.ref_counts[block_id] > 1

    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` free blocks (ref count 1 each), or ``None`` if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            return None
        blocks = [self._free.popitem(last=False)[0] for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
            if self._keys:
                self._evict(b)
        return blocks

    # ---- prefix cache ------------------------------------------------------------------

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache, held or not."""
        return len(self._cached)

    @property
    def num_evictable(self) -> int:
        """Cached blocks that nobody holds: reusable by a matching prefix until evicted."""
        return sum(1 for b in self._cached.values() if self.ref_counts[b] == 0)

    def lookup(self, block_hash: bytes, tokens: Sequence[int]) -> int | None:
        """The block caching exactly ``tokens`` under ``block_hash``, or ``None``."""
        b = self._cached.get(block_hash)
        if b is None or self._keys[b][1] != tuple(tokens):
            return None  # absent, or a collision: never serve another prefix's K/V
        return b

    def register(self, block_id: int, block_hash: bytes, tokens: Sequence[int]) -> bool:
        """Record that held block ``block_id`` now holds ``tokens`` (whose chained hash is
        ``block_hash``). A no-op returning False if another block already caches that hash
        (two requests computed the same block in one step: the first one stays the copy
        of record, and the second block remains private) or this block is registered."""
        if self.ref_counts[block_id] == 0:
            raise BlockPoolError(f"block {block_id} is free; only a held block can be registered")
        if block_hash in self._cached or block_id in self._keys:
            return False
        self._cached[block_hash] = block_id
        self._keys[block_id] = (block_hash, tuple(tokens))
        return True

    def take(self, block_ids: Sequence[int]) -> None:
        """Add a holder to cached blocks, reviving those that wait in the free queue."""
        for b in block_ids:
            if b not in self._keys:
                raise BlockPoolError(f"block {b} is not in the prefix cache")
        for b in block_ids:
            if self.ref_counts[b] == 0:
                del self._free[b]
            self.ref_counts[b] += 1

    def forget(self, block_ids: Iterable[int]) -> None:
        """Drop these blocks' prefix-cache entries, if any: their contents are not to be
        trusted (the step that was to compute them failed)."""
        for b in block_ids:
            key = self._keys.pop(b, None)
            if key is not None:
                del self._cached[key[0]]

    def _evict(self, block_id: int) -> None:
        key = self._keys.pop(block_id, None)
        if key is not None:
            del self._cached[key[0]]
            self.num_evictions += 1

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add a holder to blocks that are already referenced (sharing, forks)."""
        block_ids = list(block_ids)
        for b in block_ids:
            self._check_id(b)
            if self.ref_counts[b] == 0:
                raise BlockPoolError(f"block {b} is free; only referenced blocks can be shared")
        for b in block_ids:
            self.ref_counts[b] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free queue.

        Validated before anything changes: a double free or an unknown id raises
        :class:`BlockPoolError` and leaves the pool exactly as it was.
        """
        block_ids = list(block_ids)
        for b in block_ids:
            self._check_id(b)
        for b, times in Counter(block_ids).items():
            if self.ref_counts[b] < times:
                raise BlockPoolError(
                    f"double free of block {b}: ref count {self.ref_counts[b]}, freed {times} time(s)"
                )
        for b in block_ids:
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None

    def snapshot(self) -> PoolSnapshot:
        return PoolSnapshot(
            tuple(self.ref_counts), tuple(self._free), tuple(sorted(self._keys.items())),
            tuple(sorted(self._cached.items())),
        )

    def check(self) -> None:
        """Raise :class:`BlockPoolError` if any invariant in the module docstring fails
        (``pagedkv.paged.invariants.POOL_CHECKS``)."""
        for v in violations(POOL_CHECKS, self):
            raise BlockPoolError(str(v))

    def _check_id(self, block_id: int) -> None:
        if type(block_id) is not int or not 0 <= block_id < self.num_blocks:  # no bools, no floats
            raise BlockPoolError(f"unknown block id {block_id!r} (pool has {self.num_blocks} blocks)")
