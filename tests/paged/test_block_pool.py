"""Unit tests of the block pool and the KV cache manager: counts, LRU reuse, tail-first
release, copy-on-write, and atomic failure (a refused call changes nothing at all)."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

import pytest
from hypothesis import given, strategies as st

from pagedkv.paged import Allocation, BlockPool, BlockPoolError, BlockTable, KVCacheManager, PoolSnapshot

TableState = dict[Hashable, tuple[tuple[int, ...], int]]


def tables_state(manager: KVCacheManager, seq_ids: list[Hashable]) -> TableState:
    """An immutable copy of the given sequences' tables (blocks and token counts)."""
    return {s: (tuple(manager.block_ids(s)), manager.table(s).num_tokens) for s in seq_ids}


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize("num_blocks", [0, -1, 2.0, None])
def test_pool_rejects_bad_num_blocks(num_blocks: object) -> None:
    """A pool needs a whole number of blocks, at least one."""
    with pytest.raises(ValueError):
        BlockPool(num_blocks)  # type: ignore[arg-type]


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (-3, 4), (4, 0), (4, -1), (4, 1.5)])
def test_manager_rejects_bad_sizes(num_blocks: object, block_size: object) -> None:
    """The manager refuses num_blocks < 1 and block_size < 1 (or non-integer sizes)."""
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks, block_size)  # type: ignore[arg-type]


def test_fresh_pool_is_all_free_in_id_order() -> None:
    """A new pool has every block free with ref count 0, queued in id order."""
    pool = BlockPool(5)
    assert (pool.num_free, pool.num_used) == (5, 0)
    assert pool.snapshot() == PoolSnapshot((0,) * 5, (0, 1, 2, 3, 4))
    pool.check()


# ---------------------------------------------------------------- allocate / incref / free


def test_allocate_takes_from_the_front_with_ref_count_one() -> None:
    """Allocated blocks come off the front of the queue with ref count 1; counts follow."""
    pool = BlockPool(5)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.snapshot() == PoolSnapshot((1, 1, 1, 0, 0), (3, 4))
    assert (pool.num_free, pool.num_used) == (2, 3)
    pool.check()


def test_allocate_is_all_or_nothing() -> None:
    """Asking for more blocks than are free returns None and changes nothing."""
    pool = BlockPool(5)
    pool.allocate(3)
    before = pool.snapshot()
    assert pool.allocate(3) is None
    assert pool.snapshot() == before
    assert pool.allocate(2) == [3, 4]
    assert pool.allocate(1) is None
    assert pool.num_free == 0


def test_allocate_zero_works_even_when_full_and_negative_is_refused() -> None:
    """allocate(0) grants an empty list on a full pool; allocate(-1) raises, changing nothing."""
    pool = BlockPool(2)
    pool.allocate(2)
    before = pool.snapshot()
    assert pool.allocate(0) == []
    with pytest.raises(ValueError):
        pool.allocate(-1)
    assert pool.snapshot() == before


def test_incref_and_free_count_holders() -> None:
    """A shared block returns to the free queue only when its last holder frees it."""
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    assert blocks is not None
    a, b = blocks
    pool.incref([a, a, b])
    assert (pool.ref_count(a), pool.ref_count(b)) == (3, 2)
    pool.free([a, b])
    assert pool.snapshot() == PoolSnapshot((2, 1, 0), (2,))
    pool.free([a, a])  # freeing one block twice in a call is fine while it has two holders
    assert pool.snapshot() == PoolSnapshot((0, 1, 0), (2, 0))
    pool.free([b])
    assert pool.snapshot() == PoolSnapshot((0, 0, 0), (2, 0, 1))
    assert (pool.num_free, pool.num_used) == (3, 0)
    pool.check()


def test_free_queue_is_lru() -> None:
    """The least recently freed block is handed out first; one call frees in the order given."""
    pool = BlockPool(6)
    pool.allocate(6)
    pool.free([3])
    pool.free([1])
    pool.free([5, 0])
    assert pool.snapshot().free_order == (3, 1, 5, 0)
    assert pool.allocate(2) == [3, 1]
    pool.free([1])
    assert pool.snapshot().free_order == (5, 0, 1)
    assert pool.allocate(3) == [5, 0, 1]


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 4)), max_size=60))
def test_pool_matches_a_fifo_model(ops: list[tuple[bool, int]]) -> None:
    """Under any mix of allocations and frees, the pool hands out blocks exactly as a
    FIFO queue of freed blocks would, and its counts match that model."""
    pool = BlockPool(6)
    free: deque[int] = deque(range(6))
    held: list[int] = []
    for is_alloc, n in ops:
        if is_alloc:
            expected = [free.popleft() for _ in range(n)] if n <= len(free) else None
            assert pool.allocate(n) == expected
            held += expected or []
        elif held:
            block = held.pop(n % len(held))
            pool.free([block])
            free.append(block)
        assert pool.snapshot().free_order == tuple(free)
        assert (pool.num_free, pool.num_used) == (len(free), 6 - len(free))
    pool.check()


# ---------------------------------------------------------------- contract violations


def _used_pool() -> BlockPool:
    """Pool of 4: block 0 held once, block 1 held twice, blocks 2 and 3 free (3 first)."""
    pool = BlockPool(4)
    pool.allocate(4)
    pool.free([3, 2])
    pool.incref([1])
    return pool


@pytest.mark.parametrize(
    "block_ids",
    [
        [2],  # already free: double free
        [0, 0],  # twice in one call, ref count 1
        [1, 1, 1],  # three times, ref count 2
        [0, 2],  # valid id then a free one: the valid one must not be freed either
        [-1],
        [4],
        [0, 99],
        [1.0],
        ["0"],
        [None],
    ],
    ids=["free-block", "twice-rc1", "thrice-rc2", "valid-then-free", "negative", "too-big",
         "valid-then-too-big", "float", "str", "none"],
)
def test_bad_free_raises_and_changes_nothing(block_ids: list[object]) -> None:
    """Double frees and unknown ids raise BlockPoolError and leave the pool exactly as it was."""
    pool = _used_pool()
    before = pool.snapshot()
    with pytest.raises(BlockPoolError):
        pool.free(block_ids)  # type: ignore[arg-type]
    assert pool.snapshot() == before
    pool.check()


@pytest.mark.parametrize(
    "block_ids",
    [[2], [0, 3], [-1], [4], [0, 1.0], ["1"]],
    ids=["free-block", "held-then-free", "negative", "too-big", "held-then-float", "str"],
)
def test_bad_incref_raises_and_changes_nothing(block_ids: list[object]) -> None:
    """Sharing a free block or an unknown id raises BlockPoolError and changes nothing."""
    pool = _used_pool()
    before = pool.snapshot()
    with pytest.raises(BlockPoolError):
        pool.incref(block_ids)  # type: ignore[arg-type]
    assert pool.snapshot() == before


@pytest.mark.parametrize("block_id", [-1, 4, 0.0, "0"])
def test_ref_count_of_unknown_id_raises(block_id: object) -> None:
    """Asking for the ref count of a block that does not exist is an error, not a zero."""
    with pytest.raises(BlockPoolError):
        _used_pool().ref_count(block_id)  # type: ignore[arg-type]


def test_free_with_float_alias_of_a_held_id_is_atomic() -> None:
    """free([1, 1.0]) on a block held twice must raise BlockPoolError and change nothing."""
    pool = _used_pool()
    before = pool.snapshot()
    with pytest.raises(BlockPoolError):
        pool.free([1, 1.0])  # type: ignore[list-item]
    assert pool.snapshot() == before


def test_free_rejects_bool_ids() -> None:
    """A bool is not a block id: free([True]) must raise BlockPoolError and change nothing."""
    pool = BlockPool(2)
    pool.allocate(2)
    before = pool.snapshot()
    with pytest.raises(BlockPoolError):
        pool.free([True])
    assert pool.snapshot() == before


# ---------------------------------------------------------------- block tables


def test_slot_of_a_hand_built_table() -> None:
    """Token i lives at blocks[i // bs] * bs + i % bs; outside [0, num_tokens) is an IndexError."""
    table = BlockTable(block_size=3, blocks=(7, 2, 5), num_tokens=8)
    assert [table.slot(i) for i in range(8)] == [21, 22, 23, 6, 7, 8, 15, 16]
    for i in (-1, 8, 9):
        with pytest.raises(IndexError):
            table.slot(i)


@given(st.integers(1, 8), st.permutations(range(10)), st.data())
def test_slot_formula(block_size: int, perm: list[int], data: st.DataObject) -> None:
    """For any table, slot(i) follows the formula for every token and nowhere else."""
    num_blocks = data.draw(st.integers(1, 10))
    num_tokens = data.draw(st.integers((num_blocks - 1) * block_size + 1, num_blocks * block_size))
    blocks = tuple(perm[:num_blocks])
    table = BlockTable(block_size, blocks, num_tokens)
    for i in range(num_tokens):
        assert table.slot(i) == blocks[i // block_size] * block_size + i % block_size
    for i in (-1, num_tokens, num_blocks * block_size):
        with pytest.raises(IndexError):
            table.slot(i)


# ---------------------------------------------------------------- the manager


def test_allocate_slots_grows_only_when_the_last_block_is_full() -> None:
    """A sequence takes a new block exactly when its tokens overflow the last one."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    assert kv.allocate_slots("a", 3) == Allocation([0], [])
    assert kv.allocate_slots("a", 4) == Allocation([], [])
    assert kv.allocate_slots("a", 9) == Allocation([1, 2], [])
    assert kv.allocate_slots("a", 5) == Allocation([], [])  # shrinking asks for nothing
    assert tables_state(kv, ["a"]) == {"a": ((0, 1, 2), 9)}
    assert kv.num_free_blocks == 5
    kv.check()


def test_manager_free_releases_tail_first() -> None:
    """Freeing a sequence queues its blocks last-to-first, after the blocks already free."""
    kv = KVCacheManager(num_blocks=8, block_size=2)
    kv.pool.allocate(8)
    kv.pool.free([6, 2, 7, 0, 5, 3, 1, 4])  # scramble the queue so table order != id order
    kv.allocate_slots("a", 7)
    assert kv.block_ids("a") == (6, 2, 7, 0)
    assert kv.free("a") == 4
    assert kv.pool.snapshot().free_order == (5, 3, 1, 4, 0, 7, 2, 6)
    assert not kv.has("a")
    assert kv.free("a") == 0  # idempotent
    kv.check()


def test_freeing_a_forked_parent_keeps_shared_blocks() -> None:
    """Blocks still held by a fork stay out of the free queue; the last holder frees them tail first."""
    kv = KVCacheManager(num_blocks=5, block_size=2)
    kv.allocate_slots("p", 6)
    kv.fork("p", "c")
    assert kv.free("p") == 3
    assert kv.pool.snapshot() == PoolSnapshot((1, 1, 1, 0, 0), (3, 4))
    kv.check()
    assert kv.free("c") == 3
    assert kv.pool.snapshot() == PoolSnapshot((0,) * 5, (3, 4, 2, 1, 0))


def test_refused_allocation_changes_nothing() -> None:
    """allocate_slots returns None when the pool is short, for new and growing sequences,
    and leaves ref counts, the free queue and every table exactly as they were."""
    kv = KVCacheManager(num_blocks=4, block_size=4)
    kv.allocate_slots("a", 5)
    kv.allocate_slots("b", 1)
    before = (kv.pool.snapshot(), tables_state(kv, ["a", "b"]))
    assert kv.allocate_slots("new", 5) is None
    assert not kv.has("new")
    assert kv.allocate_slots("a", 13) is None
    assert kv.allocate_slots("b", 9) is None
    assert (kv.pool.snapshot(), tables_state(kv, ["a", "b"])) == before
    assert kv.num_tables() == 2
    kv.check()


def test_refused_copy_on_write_changes_nothing() -> None:
    """A fork whose shared last block is partial cannot append in a pool with no free block:
    None for child and parent alike, and nothing changes (no half-done copy)."""
    kv = KVCacheManager(num_blocks=2, block_size=4)
    kv.allocate_slots("p", 5)
    kv.fork("p", "c")
    assert kv.num_free_blocks == 0
    before = (kv.pool.snapshot(), tables_state(kv, ["p", "c"]))
    assert kv.allocate_slots("c", 6) is None
    assert kv.allocate_slots("p", 8) is None
    assert kv.allocate_slots("c", 9) is None
    assert (kv.pool.snapshot(), tables_state(kv, ["p", "c"])) == before
    kv.check()


def test_refused_copy_on_write_plus_growth_changes_nothing() -> None:
    """Copy-on-write plus a new block needs two free blocks; with one it is refused atomically."""
    kv = KVCacheManager(num_blocks=3, block_size=4)
    kv.allocate_slots("p", 5)
    kv.fork("p", "c")
    before = (kv.pool.snapshot(), tables_state(kv, ["p", "c"]))
    assert kv.allocate_slots("c", 9) is None
    assert (kv.pool.snapshot(), tables_state(kv, ["p", "c"])) == before
    assert kv.allocate_slots("c", 8) == Allocation([2], [(1, 2)])
    kv.check()


def test_copy_on_write_of_a_partial_shared_block() -> None:
    """Appending to a fork whose last block is shared and partial gives the child a fresh
    block, reports the (src, dst) copy, and leaves the parent's table untouched."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate_slots("p", 6)
    kv.fork("p", "c")
    assert tables_state(kv, ["p", "c"]) == {"p": ((0, 1), 6), "c": ((0, 1), 6)}
    assert kv.allocate_slots("c", 7) == Allocation([2], [(1, 2)])
    assert tables_state(kv, ["p", "c"]) == {"p": ((0, 1), 6), "c": ((0, 2), 7)}
    assert [kv.pool.ref_count(b) for b in (0, 1, 2)] == [2, 1, 1]
    # The parent now holds its last block alone, so it writes in place.
    assert kv.allocate_slots("p", 8) == Allocation([], [])
    assert tables_state(kv, ["p"]) == {"p": ((0, 1), 8)}
    kv.check()


def test_parent_appending_after_fork_copies_too() -> None:
    """Copy-on-write is symmetric: the parent, too, must not write into a shared partial block."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate_slots("p", 2)
    kv.fork("p", "c")
    assert kv.allocate_slots("p", 3) == Allocation([1], [(0, 1)])
    assert tables_state(kv, ["p", "c"]) == {"p": ((1,), 3), "c": ((0,), 2)}
    kv.check()


def test_copy_on_write_with_growth() -> None:
    """A copy and new blocks in one call: the copy's target replaces the shared block, the
    rest extend the table."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate_slots("p", 6)
    kv.fork("p", "c")
    assert kv.allocate_slots("c", 13) == Allocation([2, 3, 4], [(1, 2)])
    assert tables_state(kv, ["p", "c"]) == {"p": ((0, 1), 6), "c": ((0, 2, 3, 4), 13)}
    kv.check()


def test_no_copy_when_the_shared_last_block_is_full() -> None:
    """When the shared last block is full, the next token goes to a fresh block: no copy."""
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.allocate_slots("p", 8)
    kv.fork("p", "c")
    assert kv.allocate_slots("c", 9) == Allocation([2], [])
    assert tables_state(kv, ["p", "c"]) == {"p": ((0, 1), 8), "c": ((0, 1, 2), 9)}
    assert [kv.pool.ref_count(b) for b in (0, 1, 2)] == [2, 2, 1]
    kv.check()


def test_fork_onto_an_existing_sequence_raises_and_changes_nothing() -> None:
    """Forking into a sequence id that already has a table is refused without side effects."""
    kv = KVCacheManager(num_blocks=4, block_size=2)
    kv.allocate_slots("a", 3)
    kv.allocate_slots("b", 1)
    before = (kv.pool.snapshot(), tables_state(kv, ["a", "b"]))
    with pytest.raises(BlockPoolError):
        kv.fork("a", "b")
    with pytest.raises(BlockPoolError):
        kv.fork("a", "a")
    assert (kv.pool.snapshot(), tables_state(kv, ["a", "b"])) == before
