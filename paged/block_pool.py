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
first. That order is what later lets cached-but-free blocks be evicted LRU-first.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable
from typing import NamedTuple


class BlockPoolError(RuntimeError):
    """A caller broke the pool's contract (double free, unknown id, ...)."""


class PoolSnapshot(NamedTuple):
    """An immutable copy of the pool's state, for atomicity checks in tests."""

    ref_counts: tuple[int, ...]
    free_order: tuple[int, ...]


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
        return blocks

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
        return PoolSnapshot(tuple(self.ref_counts), tuple(self._free))

    def check(self) -> None:
        """Raise :class:`BlockPoolError` if any invariant in the module docstring fails."""
        for b, rc in enumerate(self.ref_counts):
            if rc < 0:
                raise BlockPoolError(f"block {b} has negative ref count {rc}")
            if (rc == 0) != (b in self._free):
                raise BlockPoolError(f"block {b}: ref count {rc} but free={b in self._free}")
        if self.num_free + sum(1 for rc in self.ref_counts if rc > 0) != self.num_blocks:
            raise BlockPoolError("free + used != total")

    def _check_id(self, block_id: int) -> None:
        if type(block_id) is not int or not 0 <= block_id < self.num_blocks:  # no bools, no floats
            raise BlockPoolError(f"unknown block id {block_id!r} (pool has {self.num_blocks} blocks)")
