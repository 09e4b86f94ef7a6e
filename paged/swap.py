"""The swap space's bookkeeping: where a preempted sequence's K/V waits in CPU memory.

Swap preemption copies a victim's blocks from the device pool into a pool of CPU blocks
and back when it resumes, instead of recomputing them. This module only hands out CPU
block ids and remembers which a swapped sequence holds; the copies are the executor's
(``KVCache.swap_out`` / ``swap_in``). The space has a fixed number of blocks (from a byte
budget); when a victim does not fit, the scheduler recomputes it instead. Torch-free.

Invariants (:meth:`SwapSpace.check`): every block is free xor held by exactly one
swapped sequence; free + held == total.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple

from pagedkv.paged.invariants import SWAP_CHECKS, violations


class SwapSpaceError(RuntimeError):
    """A swap space invariant was broken: a bug, never a user error."""


class SwappedTable(NamedTuple):
    """A swapped-out sequence: its CPU blocks in logical order, and the token slots they hold."""

    blocks: tuple[int, ...]
    num_tokens: int


class SwapSpace:
    def __init__(self, num_blocks: int) -> None:
        if type(num_blocks) is not int or num_blocks < 0:
            raise ValueError(f"num_blocks must be an integer >= 0, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() takes the lowest id first
        self._tables: dict[Hashable, SwappedTable] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def free_blocks(self) -> tuple[int, ...]:
        return tuple(self._free)

    def has(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def seq_ids(self) -> list[Hashable]:
        """The swapped-out sequences."""
        return list(self._tables)

    def table(self, seq_id: Hashable) -> SwappedTable:
        return self._tables[seq_id]

    def store(self, seq_id: Hashable, num_blocks: int, num_tokens: int) -> tuple[int, ...] | None:
        """Give ``seq_id`` ``num_blocks`` CPU blocks; ``None`` (nothing changed) if they are not free."""
        if seq_id in self._tables:
            raise SwapSpaceError(f"sequence {seq_id!r} is already swapped out")
        if num_blocks > len(self._free):
            return None
        blocks = tuple(self._free.pop() for _ in range(num_blocks))
        self._tables[seq_id] = SwappedTable(blocks, num_tokens)
        return blocks

    def release(self, seq_id: Hashable) -> SwappedTable | None:
        """Free ``seq_id``'s CPU blocks (after they were copied back, or on abort); idempotent."""
        table = self._tables.pop(seq_id, None)
        if table is not None:
            self._free.extend(reversed(table.blocks))
        return table

    def check(self) -> None:
        """Raise :class:`SwapSpaceError` if an invariant fails (``pagedkv.paged.invariants.SWAP_CHECKS``)."""
        for v in violations(SWAP_CHECKS, self):
            raise SwapSpaceError(str(v))
