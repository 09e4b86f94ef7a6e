"""The KV cache manager: block tables for every sequence on top of one block pool.

This is the only object the scheduler talks to about memory. It answers in small result
objects (an :class:`Allocation`, or ``None`` for "cannot") and never exposes the pool's
free queue. Pure Python, so the simulator runs it unchanged.

Invariants (checked by :meth:`KVCacheManager.check` and the property tests):

- the ref count of every block equals the number of block tables holding it;
- a block that a sequence is about to write into is held by that sequence alone
  (shared partial blocks are copied on write first);
- once every sequence is freed, the pool is whole again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from typing import NamedTuple

from paged.block_pool import BlockPool, BlockPoolError
from paged.block_table import BlockTable, blocks_for


class Allocation(NamedTuple):
    """What one successful :meth:`KVCacheManager.allocate_slots` granted.

    ``copies`` lists ``(src, dst)`` block pairs whose K/V must be copied before the step
    writes into ``dst`` (copy-on-write of a shared, partially filled last block).
    """

    new_blocks: list[int]
    copies: list[tuple[int, int]]


NOTHING = Allocation([], [])  # what a grow that needs no new block returns (never mutated)


class KVCacheManager:
    """Block tables keyed by sequence id, backed by a :class:`BlockPool`."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if type(block_size) is not int or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[Hashable, BlockTable] = {}
        self._stored = 0  # token slots handed out, summed over every table

    @property
    def num_stored_tokens(self) -> int:
        """Token slots in use by sequences (a shared block counts once per holder)."""
        return self._stored

    @property
    def num_reserved_slots(self) -> int:
        """Token slots set aside for sequences: whole blocks, partly filled or not."""
        return self.pool.num_used * self.block_size

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def has(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def table(self, seq_id: Hashable) -> BlockTable:
        return self._tables[seq_id]

    def block_ids(self, seq_id: Hashable) -> tuple[int, ...]:
        return self._tables[seq_id].blocks

    def num_tables(self) -> int:
        return len(self._tables)

    def allocate_slots(self, seq_id: Hashable, num_tokens: int) -> Allocation | None:
        """Grow ``seq_id``'s table so that its first ``num_tokens`` tokens have slots.

        A new block is taken only when the last one is full. All-or-nothing: on
        ``None`` (not enough free blocks) the pool and every table are unchanged.
        """
        table = self._tables.get(seq_id)
        if table is None:
            table = BlockTable(self.block_size)
        elif num_tokens <= table.num_tokens:
            return NOTHING
        elif num_tokens <= len(table.blocks) * self.block_size and self.pool.ref_counts[table.blocks[-1]] == 1:
            # The common decode step: the last block is ours alone and still has room.
            self._stored += num_tokens - table.num_tokens
            table.num_tokens = num_tokens
            return NOTHING
        cow = table.last_block_partial and self.pool.is_shared(table.blocks[-1])
        needed = blocks_for(num_tokens, self.block_size) - len(table.blocks) + int(cow)
        granted = self.pool.allocate(needed)
        if granted is None:
            return None
        copies: list[tuple[int, int]] = []
        if cow:
            src, dst = table.blocks[-1], granted[0]
            self.pool.free([src])  # the other holders keep it
            table.blocks = (*table.blocks[:-1], *granted)
            copies.append((src, dst))
        else:
            table.blocks = (*table.blocks, *granted)
        self._stored += num_tokens - table.num_tokens
        table.num_tokens = num_tokens
        self._tables[seq_id] = table
        return Allocation(granted, copies)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Give ``child_id`` a table sharing every block of ``parent_id``'s."""
        if child_id in self._tables:
            raise BlockPoolError(f"sequence {child_id!r} already has a block table")
        parent = self._tables[parent_id]
        self.pool.incref(parent.blocks)
        self._tables[child_id] = BlockTable(self.block_size, parent.blocks, parent.num_tokens)
        self._stored += parent.num_tokens

    def free(self, seq_id: Hashable) -> int:
        """Release ``seq_id``'s blocks (tail first) and drop its table; idempotent.

        Returns how many block references were released (0 if it held none).
        """
        table = self._tables.pop(seq_id, None)
        if table is None:
            return 0
        self.pool.free(reversed(table.blocks))
        self._stored -= table.num_tokens
        return len(table.blocks)

    def check(self) -> None:
        """Raise :class:`BlockPoolError` if a pool or table invariant fails."""
        self.pool.check()
        holders = Counter(b for t in self._tables.values() for b in t.blocks)
        for b in range(self.pool.num_blocks):
            if self.pool.ref_count(b) != holders[b]:
                raise BlockPoolError(
                    f"block {b}: ref count {self.pool.ref_count(b)} but held by {holders[b]} table(s)"
                )
        for seq_id, t in self._tables.items():
            if len(t.blocks) != blocks_for(t.num_tokens, self.block_size):
                raise BlockPoolError(f"sequence {seq_id!r}: {len(t.blocks)} blocks for {t.num_tokens} tokens")
        if self._stored != sum(t.num_tokens for t in self._tables.values()):
            raise BlockPoolError("the stored-token count disagrees with the tables")
