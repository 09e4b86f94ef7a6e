"""A stateful property test of the KV cache manager: random interleavings of new sequences,
appends, forks, frees and oversized requests on tiny pools, checked against a plain model
after every step, and the pool whole again once every sequence is freed."""

from __future__ import annotations

from collections import Counter

from hypothesis import settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pagedkv.paged import KVCacheManager, PoolSnapshot, blocks_for

State = tuple[PoolSnapshot, dict[int, tuple[tuple[int, ...], int]]]


def has_sequences(machine: KVManagerMachine) -> bool:
    return bool(machine.model)


class KVManagerMachine(RuleBasedStateMachine):
    """Drives one :class:`KVCacheManager`; ``model`` maps each live sequence id to the
    number of tokens it should have slots for."""

    # Which interesting paths the runs took, so the test can prove they were exercised.
    coverage: Counter[str] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.manager: KVCacheManager | None = None  # made by the first rule
        self.model: dict[int, int] = {}
        self.next_id = 0
        self.just_grown: int | None = None  # the sequence the last rule wrote new slots for

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

    def pick(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(sorted(self.model)), label="seq")

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
        assert allocation is not None
        assert allocation.new_blocks == list(before[0].free_order[:needed]), "not taken LRU-first"
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
        self.manager = KVCacheManager(num_blocks, block_size)

    @rule(num_tokens=st.integers(1, 30))
    def new_sequence(self, num_tokens: int) -> None:
        self.grow(None, num_tokens)

    @precondition(has_sequences)
    @rule(data=st.data(), extra=st.integers(1, 12))
    def append(self, data: st.DataObject, extra: int) -> None:
        seq = self.pick(data)
        self.grow(seq, self.model[seq] + extra)

    @precondition(has_sequences)
    @rule(data=st.data())
    def allocate_nothing_new(self, data: st.DataObject) -> None:
        """Asking for no more slots than a sequence holds grants nothing and changes nothing."""
        seq = self.pick(data)
        before = self.state()
        allocation = self.kv.allocate_slots(seq, data.draw(st.integers(0, self.model[seq]), label="num_tokens"))
        assert allocation is not None and allocation == ([], [])
        assert self.state() == before

    @precondition(has_sequences)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent, child = self.pick(data), self.fresh_id()
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
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        """Freeing drops one reference per block; blocks reaching zero queue up tail first."""
        seq = self.pick(data)
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

    @rule(data=st.data(), slack=st.integers(0, 16))
    def too_big(self, data: st.DataObject, slack: int) -> None:
        """An allocation one block (or more) beyond what is free is refused without a trace."""
        free = self.kv.num_free_blocks
        existing = bool(self.model) and data.draw(st.booleans(), label="existing")
        seq = self.pick(data) if existing else None
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
    def free_xor_referenced(self) -> None:
        """Each block is in the free queue (once) exactly when its ref count is 0."""
        snap = self.kv.pool.snapshot()
        assert len(set(snap.free_order)) == len(snap.free_order)
        assert set(snap.free_order) <= set(range(self.kv.num_blocks))
        free = set(snap.free_order)
        for b, rc in enumerate(snap.ref_counts):
            assert rc >= 0
            assert (rc == 0) == (b in free), f"block {b}: ref count {rc}, in free queue: {b in free}"

    @invariant()
    def ref_count_is_number_of_holders(self) -> None:
        holders = Counter(b for s in self.model for b in self.kv.block_ids(s))
        expected = tuple(holders[b] for b in range(self.kv.num_blocks))
        assert self.kv.pool.snapshot().ref_counts == expected

    @invariant()
    def free_plus_used_is_total(self) -> None:
        pool = self.kv.pool
        used = sum(1 for rc in pool.snapshot().ref_counts if rc > 0)
        assert pool.num_used == used
        assert pool.num_free + used == pool.num_blocks

    @invariant()
    def tables_match_model(self) -> None:
        """Every live sequence (and no other) has a table of ceil(num_tokens / bs) blocks."""
        assert self.kv.num_tables() == len(self.model)
        for seq, num_tokens in self.model.items():
            table = self.kv.table(seq)
            assert table.num_tokens == num_tokens
            assert len(table.blocks) == blocks_for(num_tokens, self.bs)

    @invariant()
    def manager_check_passes(self) -> None:
        self.kv.check()

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
        pool = self.kv.pool
        assert pool.num_free == pool.num_blocks
        assert pool.snapshot().ref_counts == (0,) * pool.num_blocks
        assert self.kv.num_tables() == 0
        self.kv.check()


def test_kv_manager_state_machine() -> None:
    """The invariants hold along every explored run, and the runs reached refusals,
    copy-on-write, forks and frees of shared blocks (so the checks were not vacuous)."""
    KVManagerMachine.coverage.clear()
    run_state_machine_as_test(
        KVManagerMachine,
        settings=settings(max_examples=200, stateful_step_count=40, deadline=None),
    )
    seen = KVManagerMachine.coverage
    for path in ("refused-new", "refused-append", "copy-on-write", "fork", "free", "free-shared", "too-big"):
        assert seen[path] > 0, f"no run exercised {path!r}: {dict(seen)}"
