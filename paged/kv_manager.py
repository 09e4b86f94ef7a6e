"""The KV cache manager: block tables for every sequence on top of one block pool.

This is the only object the scheduler talks to about memory. It answers in small result
objects (an :class:`Allocation`, or ``None`` for "cannot") and never exposes the pool's
free queue. Pure Python, so the simulator runs it unchanged.

Invariants (checked by :meth:`KVCacheManager.check` and the property tests):

- the ref count of every block equals the number of block tables holding it;
- a block that a sequence is about to write into is held by that sequence alone
  (shared partial blocks are copied on write first);
- once every sequence is freed, the pool is whole again (cached blocks wait in the free
  queue, evictable).

With prefix caching on, a new sequence starts from :meth:`find_prefix` (its longest run of
cached full blocks) and :meth:`allocate_slots` takes references on those blocks instead of
computing them; :meth:`cache_full_blocks` registers the blocks a step fills, when the step is
scheduled (the step writes them before anyone reads them). Partially filled blocks never
enter the cache.

Swap preemption: :meth:`swap_out` moves a sequence's table to the CPU :class:`SwapSpace`
(freeing its device blocks) and :meth:`swap_in` brings it back into fresh device blocks;
each returns the block pairs the executor must copy before the step's forward pass.

Bulk decode steps: :meth:`decode_steps` grows many tables by many decode steps at once,
with exactly the effect of the step-by-step calls and work only where a block is taken or
filled; the simulator takes most of its steps so (``pagedkv.scheduler.decode_run``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import NamedTuple

from pagedkv.paged.block_pool import BlockPool, BlockPoolError
from pagedkv.paged.block_table import BlockTable, blocks_for
from pagedkv.paged.invariants import kv_violations
from pagedkv.paged.prefix import NO_HIT, PrefixHit, block_hash, root_hash
from pagedkv.paged.swap import SwapSpace


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

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = False,
        cache_salt: bytes = b"",
        num_swap_blocks: int = 0,
    ) -> None:
        if type(block_size) is not int or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.swap = SwapSpace(num_swap_blocks)
        self.prefix_caching = enable_prefix_caching
        self._root = root_hash(cache_salt)
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

    def needs_copy_on_write(self, seq_id: Hashable) -> bool:
        """Whether the next token's slot is in a block that others hold too."""
        table = self._tables[seq_id]
        return table.last_block_partial and self.pool.is_shared(table.blocks[-1])

    def num_tables(self) -> int:
        return len(self._tables)

    def seq_ids(self) -> list[Hashable]:
        """The sequences with a block table (resident ones; swapped-out ones are ``swap.seq_ids()``)."""
        return list(self._tables)

    def find_prefix(self, token_ids: Sequence[int], keys: Sequence[bytes] = ()) -> PrefixHit:
        """The longest run of cached blocks holding ``token_ids``' leading full blocks.

        Read-only. ``keys`` are the chained keys of the sequence's blocks known from an
        earlier lookup (its ``PrefixHit.keys``; the scheduler keeps them per request, so a
        request that retries admission step after step hashes its prompt once). At least one token
        is always left over, even when the whole sequence is cached: the step must compute
        the last token to get the logits to sample from.
        """
        if not self.prefix_caching:
            return NO_HIT
        bs = self.block_size
        keys = list(keys)
        blocks = []
        for i in range((len(token_ids) - 1) // bs):
            chunk = token_ids[i * bs:(i + 1) * bs]
            if i == len(keys):
                keys.append(block_hash(keys[-1] if keys else self._root, chunk))
            b = self.pool.lookup(keys[i], chunk)
            if b is None:
                break
            blocks.append(b)
        return PrefixHit(tuple(blocks), tuple(keys[: len(blocks)]), tuple(keys))

    def allocate_slots(
        self, seq_id: Hashable, num_tokens: int, prefix: PrefixHit = NO_HIT, reserve: int = 0
    ) -> Allocation | None:
        """Grow ``seq_id``'s table so that its first ``num_tokens`` tokens have slots.

        A new block is taken only when the last one is full. A new sequence may start
        from ``prefix`` (from :meth:`find_prefix`): it shares those cached blocks and gets
        fresh ones only for the rest. ``reserve`` blocks must stay free afterwards (the
        admission watermark). All-or-nothing: on ``None`` (not enough free blocks) the
        pool, the cache and every table are unchanged.
        """
        table = self._tables.get(seq_id)
        if table is None:
            if prefix.blocks:
                return self._start_from_prefix(seq_id, num_tokens, prefix, reserve)
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
        if needed + reserve > self.pool.num_free:
            return None
        granted = self._allocate(needed)
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

    def _start_from_prefix(
        self, seq_id: Hashable, num_tokens: int, prefix: PrefixHit, reserve: int
    ) -> Allocation | None:
        reviving = sum(1 for b in prefix.blocks if self.pool.ref_counts[b] == 0)  # they leave the free queue
        needed = blocks_for(num_tokens, self.block_size) - len(prefix.blocks)
        if needed + reviving + reserve > self.pool.num_free:
            return None
        self.pool.take(prefix.blocks)  # first, so that allocate cannot evict them
        granted = self._allocate(needed)
        self._tables[seq_id] = BlockTable(self.block_size, (*prefix.blocks, *granted), num_tokens, prefix.hashes)
        self._stored += num_tokens
        return Allocation(granted, [])

    def _allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks, for a caller that has checked that ``n`` are free."""
        granted = self.pool.allocate(n)
        if granted is None:
            raise BlockPoolError(f"{n} blocks were checked free but could not be allocated")
        return granted

    def cache_full_blocks(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        """Register ``seq_id``'s full blocks in the prefix cache: those holding its first
        ``num_computed`` tokens, ``token_ids[:num_computed]``, whose K/V is computed or
        will be by the step being scheduled."""
        if self.prefix_caching:
            self._register_full_blocks(self._tables[seq_id], token_ids, num_computed)

    def _register_full_blocks(self, table: BlockTable, token_ids: Sequence[int], num_computed: int) -> None:
        full, known = num_computed // self.block_size, len(table.hashes)
        if full <= known:
            return
        bs = self.block_size
        parent = table.hashes[-1] if known else self._root
        hashes = list(table.hashes)
        for i in range(known, full):
            chunk = token_ids[i * bs:(i + 1) * bs]
            parent = block_hash(parent, chunk)
            self.pool.register(table.blocks[i], parent, chunk)
            hashes.append(parent)
        table.hashes = tuple(hashes)

    def decode_steps_affordable(self, seq_ids: Sequence[Hashable]) -> int:
        """How many :meth:`decode_steps` of these sequences the free blocks cover."""
        needs = self._new_blocks_by_step(seq_ids)
        cycles, left = divmod(self.pool.num_free, len(seq_ids))  # each needs one block per block_size steps
        steps = cycles * self.block_size
        for need in needs:
            if need > left:
                break
            left -= need
            steps += 1
        return steps

    def _new_blocks_by_step(self, seq_ids: Sequence[Hashable]) -> list[int]:
        """How many of these sequences need a new block at step s of a run of decode
        steps, by s modulo the block size: those whose last block is full then."""
        bs = self.block_size
        needs = [0] * bs
        for seq_id in seq_ids:
            needs[-self._tables[seq_id].num_tokens % bs] += 1
        return needs

    def decode_steps(self, seq_ids: Sequence[Hashable], token_ids: Sequence[Sequence[int]], steps: int) -> list[int]:
        """``steps`` steps that each decode one token of every one of these sequences
        (``token_ids[i]`` holds sequence i's tokens through the last step's). The same
        effect as ``steps`` rounds of ``allocate_slots(seq, num_tokens + 1)`` then
        ``cache_full_blocks`` over the sequences in order (the same blocks, taken and
        registered in the same order), but with work only where a block is taken or
        filled. For the simulator's bulk decode steps (``pagedkv.scheduler.decode_run``). The
        caller guarantees what makes that exact: no sequence's last block with room is
        shared, and :meth:`decode_steps_affordable` covers ``steps``. Returns the blocks in
        use during each step.
        """
        bs, caching, pool = self.block_size, self.prefix_caching, self.pool
        tables = [self._tables[s] for s in seq_ids]
        # Per step modulo bs, in order: (table, tokens, takes a block, fills its last block).
        events: list[list[tuple[BlockTable, Sequence[int], bool, bool]]] = [[] for _ in range(bs)]
        for table, tokens in zip(tables, token_ids, strict=True):
            takes, fills = -table.num_tokens % bs, (-table.num_tokens - 1) % bs
            if takes == fills:  # block_size 1
                events[takes].append((table, tokens, True, caching))
            else:
                events[takes].append((table, tokens, True, False))
                if caching:
                    events[fills].append((table, tokens, False, True))
        used, in_use = [], pool.num_used  # an allocate(1) takes one free block; registering takes none
        for step in range(steps):
            for table, tokens, takes, fills in events[step % bs]:
                n = table.num_tokens + step + 1
                if takes:
                    granted = pool.allocate(1)
                    if granted is None:
                        raise BlockPoolError("decode_steps ran out of blocks: more steps than were affordable")
                    table.blocks = (*table.blocks, *granted)
                    in_use += 1
                if fills:
                    self._register_full_blocks(table, tokens, n)
            used.append(in_use)
        for table in tables:
            table.num_tokens += steps
        self._stored += steps * len(tables)
        return used

    @property
    def num_cached_blocks(self) -> int:
        return self.pool.num_cached

    @property
    def num_evictable_blocks(self) -> int:
        return self.pool.num_evictable

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Give ``child_id`` a table sharing every block of ``parent_id``'s."""
        if child_id in self._tables:
            raise BlockPoolError(f"sequence {child_id!r} already has a block table")
        parent = self._tables[parent_id]
        self.pool.incref(parent.blocks)
        self._tables[child_id] = BlockTable(self.block_size, parent.blocks, parent.num_tokens, parent.hashes)
        self._stored += parent.num_tokens

    def swap_out(self, seq_id: Hashable) -> list[tuple[int, int]] | None:
        """Move ``seq_id``'s K/V to the swap space and free its device blocks. Returns the
        ``(device block, CPU block)`` pairs to copy before the step's forward pass (whose
        new owners may write the freed blocks), or ``None``, changing nothing, when the
        swap space lacks room."""
        table = self._tables[seq_id]
        cpu = self.swap.store(seq_id, len(table.blocks), table.num_tokens)
        if cpu is None:
            return None
        pairs = list(zip(table.blocks, cpu, strict=True))
        self.free(seq_id)
        return pairs

    def swap_in(self, seq_id: Hashable, num_tokens: int, reserve: int = 0) -> list[tuple[int, int]] | None:
        """Bring swapped-out ``seq_id`` back into fresh device blocks with slots for its
        first ``num_tokens`` tokens (at least the swapped ones). Returns the ``(CPU block,
        device block)`` pairs to copy before the step's forward pass, or ``None``,
        changing nothing, when fewer than the blocks needed plus ``reserve`` are free."""
        swapped = self.swap.table(seq_id)
        num_tokens = max(num_tokens, swapped.num_tokens)
        needed = blocks_for(num_tokens, self.block_size)
        if needed + reserve > self.pool.num_free:
            return None
        granted = self._allocate(needed)
        self.swap.release(seq_id)
        self._tables[seq_id] = BlockTable(self.block_size, tuple(granted), num_tokens)
        self._stored += num_tokens
        # granted also covers the slots beyond the swapped tokens: those blocks have nothing to copy
        return list(zip(swapped.blocks, granted, strict=False))

    def forget_cached(self, seq_id: Hashable) -> None:
        """Take ``seq_id``'s blocks out of the prefix cache (before freeing it after a
        failed step: what they hold may be garbage)."""
        table = self._tables.get(seq_id)
        if table is not None:
            self.pool.forget(table.blocks)
            table.hashes = ()

    def free(self, seq_id: Hashable) -> int:
        """Release ``seq_id``'s blocks (tail first) and drop its table, or its swap space
        if it is swapped out; idempotent.

        Returns how many device block references were released (0 if it held none).
        """
        table = self._tables.pop(seq_id, None)
        if table is None:
            self.swap.release(seq_id)
            return 0
        self.pool.free(reversed(table.blocks))
        self._stored -= table.num_tokens
        return len(table.blocks)

    def check(self) -> None:
        """Raise :class:`BlockPoolError` if a pool, table or swap space invariant fails
        (:func:`pagedkv.paged.invariants.kv_violations`)."""
        for v in kv_violations(self):
            raise BlockPoolError(str(v))
