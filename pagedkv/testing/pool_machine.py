"""The pool and its block tables under random new sequences, appends, forks, frees and
oversized requests on tiny pools, checked against a plain model after every step, and the
pool whole again once every sequence is freed.

Plug in your own manager (say, a pool with another eviction order) by overriding
:meth:`KVManagerMachine.new_manager`, and :meth:`KVManagerMachine.check_taken` if its
allocation order is not least-recently-freed first.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from pagedkv.paged import Allocation, KVCacheManager, PoolSnapshot, blocks_for
from pagedkv.paged.invariants import KV_CHECKS, POOL_CHECKS, SWAP_CHECKS, pool_is_whole
from pagedkv.testing.machine import InvariantMachine

State = tuple[PoolSnapshot, dict[int, tuple[tuple[int, ...], int]]]
PICK = st.integers(0, 2**16)
"""Which live sequence a rule acts on: the pick modulo how many there are (an integer,
not a draw from the live ones, so that a reproduction is plain Python to paste)."""


def has_sequences(machine: KVManagerMachine) -> bool:
    return bool(machine.model)


class KVManagerMachine(InvariantMachine):
    """Drives one :class:`KVCacheManager`; ``model`` maps each live sequence id to the
    number of tokens it should have slots for."""

    coverage: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.manager: KVCacheManager | None = None  # made by the first rule
        self.model: dict[int, int] = {}
        self.next_id = 0
        self.just_grown: int | None = None  # the sequence the last rule wrote new slots for

    # ------------------------------------------------------------ for subclasses

    def new_manager(self, num_blocks: int, block_size: int) -> KVCacheManager:
        return KVCacheManager(num_blocks, block_size)

    def check_taken(self, allocation: Allocation, free_before: tuple[int, ...]) -> None:
        """The blocks an allocation took: least recently freed first (the free queue's head)."""
        taken = len(allocation.new_blocks)
        assert allocation.new_blocks == list(free_before[:taken]), "not taken LRU-first"

    # ------------------------------------------------------------ helpers

    @property
    def kv(self) -> KVCacheManager:
        assert self.manager is not None, "make_manager runs first"
        return self.manager

    @property
    def bs(self) -> int:
        return self.kv.block_size

    def fresh_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def pick(self, pick: int) -> int:
        live = sorted(self.model)
        return live[pick % len(live)]

    def state(self) -> State:
        """The whole observable state: the pool's snapshot and every table."""
        tables = {s: (tuple(self.kv.block_ids(s)), self.kv.table(s).num_tokens) for s in self.model}
        return self.kv.pool.snapshot(), tables

    def needs_copy(self, seq: int) -> bool:
        """Whether writing past ``seq``'s current tokens must first copy its last block."""
        table = self.kv.table(seq)
        return table.num_tokens % self.bs != 0 and self.kv.pool.ref_count(table.blocks[-1]) > 1

    def blocks_needed(self, seq: int | None, num_tokens: int) -> int:
        """Blocks an allocation to ``num_tokens`` must take from the pool (``seq=None``: new)."""
        if seq is None:
            return blocks_for(num_tokens, self.bs)
        held = len(self.kv.block_ids(seq))
        return blocks_for(num_tokens, self.bs) - held + int(self.needs_copy(seq))

    def grow(self, seq: int | None, num_tokens: int) -> None:
        """Allocate slots and check the result against what the model predicts."""
        sid = self.fresh_id() if seq is None else seq
        needed = self.blocks_needed(seq, num_tokens)
        copy = seq is not None and self.needs_copy(seq)
        old_blocks = [] if seq is None else list(self.kv.block_ids(seq))
        before = self.state()
        allocation = self.kv.allocate_slots(sid, num_tokens)
        if needed > before[0].ref_counts.count(0):
            assert allocation is None
            assert self.state() == before, "a refused allocation changed the pool or a table"
            assert seq is not None or not self.kv.has(sid)
            self.coverage["refused-new" if seq is None else "refused-append"] += 1
            return
        assert allocation is not None, f"refused {needed} blocks with {before[0].ref_counts.count(0)} free"
        assert len(allocation.new_blocks) == needed, f"took {len(allocation.new_blocks)} blocks for {needed}"
        self.check_taken(allocation, before[0].free_order)
        assert all(self.kv.pool.ref_count(b) == 1 for b in allocation.new_blocks)
        if copy:
            src, dst = old_blocks[-1], allocation.new_blocks[0]
            assert allocation.copies == [(src, dst)]
            assert list(self.kv.block_ids(sid)) == old_blocks[:-1] + allocation.new_blocks
            assert self.kv.pool.ref_count(src) == before[0].ref_counts[src] - 1
            self.coverage["copy-on-write"] += 1
        else:
            assert allocation.copies == []
            assert list(self.kv.block_ids(sid)) == old_blocks + allocation.new_blocks
        self.model[sid] = num_tokens
        self.just_grown = sid

    # ------------------------------------------------------------ rules

    @initialize(num_blocks=st.integers(1, 24), block_size=st.integers(1, 8))
    def make_manager(self, num_blocks: int, block_size: int) -> None:
        self.manager = self.new_manager(num_blocks, block_size)

    @rule(num_tokens=st.integers(1, 30))
    def new_sequence(self, num_tokens: int) -> None:
        self.grow(None, num_tokens)

    @precondition(has_sequences)
    @rule(pick=PICK, extra=st.integers(1, 12))
    def append(self, pick: int, extra: int) -> None:
        seq = self.pick(pick)
        self.grow(seq, self.model[seq] + extra)

    @precondition(has_sequences)
    @rule(pick=PICK, num_tokens=st.integers(0, 2**16))
    def allocate_nothing_new(self, pick: int, num_tokens: int) -> None:
        """Asking for no more slots than a sequence holds grants nothing and changes nothing."""
        seq = self.pick(pick)
        before = self.state()
        allocation = self.kv.allocate_slots(seq, num_tokens % (self.model[seq] + 1))
        assert allocation is not None and allocation == ([], [])
        assert self.state() == before

    @precondition(has_sequences)
    @rule(pick=PICK)
    def fork(self, pick: int) -> None:
        parent, child = self.pick(pick), self.fresh_id()
        before = self.kv.pool.snapshot()
        self.kv.fork(parent, child)
        blocks = self.kv.block_ids(parent)
        assert self.kv.block_ids(child) == blocks  # immutable tuples: sharing them is safe
        assert self.kv.table(child).num_tokens == self.model[parent]
        bumped = Counter(blocks)
        after = self.kv.pool.snapshot()
        assert after.ref_counts == tuple(rc + bumped[b] for b, rc in enumerate(before.ref_counts))
        assert after.free_order == before.free_order
        self.model[child] = self.model[parent]
        self.just_grown = None if self.just_grown == parent else self.just_grown
        self.coverage["fork"] += 1

    @precondition(has_sequences)
    @rule(pick=PICK)
    def free(self, pick: int) -> None:
        """Freeing drops one reference per block; blocks reaching zero queue up tail first."""
        seq = self.pick(pick)
        blocks = list(self.kv.block_ids(seq))
        before = self.kv.pool.snapshot()
        assert self.kv.free(seq) == len(blocks)
        released = tuple(b for b in reversed(blocks) if before.ref_counts[b] == 1)
        assert self.kv.pool.snapshot().free_order == before.free_order + released
        assert not self.kv.has(seq)
        assert self.kv.free(seq) == 0
        del self.model[seq]
        self.just_grown = None if self.just_grown == seq else self.just_grown
        self.coverage["free-shared" if len(released) < len(blocks) else "free"] += 1

    @rule(pick=st.none() | PICK, slack=st.integers(0, 16))
    def too_big(self, pick: int | None, slack: int) -> None:
        """An allocation one block (or more) beyond what is free is refused without a trace.
        ``pick`` ``None``: a new sequence."""
        free = self.kv.num_free_blocks
        seq = None if pick is None or not self.model else self.pick(pick)
        if seq is None:
            num_tokens = free * self.bs + 1 + slack
        else:
            held = len(self.kv.block_ids(seq))
            # With a copy pending, the first token past the current ones already costs a block.
            enough = (held + free - int(self.needs_copy(seq))) * self.bs + 1
            num_tokens = max(enough, self.model[seq] + 1) + slack
        assert self.blocks_needed(seq, num_tokens) > free
        before = self.state()
        assert self.kv.allocate_slots(self.fresh_id() if seq is None else seq, num_tokens) is None
        assert self.state() == before
        self.coverage["too-big"] += 1

    # ------------------------------------------------------------ invariants

    @invariant()
    def catalogue_holds(self) -> None:
        """The pool's and the manager's invariants (:mod:`pagedkv.testing.invariants`)."""
        if self.manager is not None:
            self.expect(POOL_CHECKS, self.kv.pool)
            self.expect(SWAP_CHECKS, self.kv.swap)
            self.expect(KV_CHECKS, self.kv)

    @invariant()
    def tables_match_model(self) -> None:
        """Every live sequence (and no other) has a table of ceil(num_tokens / bs) blocks."""
        if self.manager is None:
            return
        assert self.kv.num_tables() == len(self.model)
        for seq, num_tokens in self.model.items():
            table = self.kv.table(seq)
            assert table.num_tokens == num_tokens
            assert len(table.blocks) == blocks_for(num_tokens, self.bs)

    @invariant()
    def just_written_block_is_exclusive(self) -> None:
        """Copy-on-write: the last block of the sequence that just grew is held by it alone."""
        if self.just_grown is not None:
            assert self.kv.pool.ref_count(self.kv.block_ids(self.just_grown)[-1]) == 1

    def teardown(self) -> None:
        """Whatever happened, freeing every sequence makes the pool whole again."""
        if self.manager is None:
            return
        for seq in list(self.model):
            self.kv.free(seq)
        self.expect([pool_is_whole, *KV_CHECKS], self.kv)
