"""The KV manager with prefix caching, forks and swap: sequences over a 2-token alphabet
(so prefixes collide often) share prefixes, hit the cache, grow, fork, copy on write,
evict, swap out and back in, on a tiny pool. A stand-in for the K/V tensors lets the
machine check that every sequence reads what a fresh computation would have written, and
that every cached block holds what its key says.

``kv_of[slot]`` and ``swap_of[slot]`` (device and CPU swap slots) hold the token prefix
whose last token's K/V the slot holds. Plug in your own manager by overriding
:meth:`PrefixCacheMachine.new_manager`.
"""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from pagedkv.paged import KVCacheManager
from pagedkv.paged.invariants import KV_CHECKS, POOL_CHECKS, SWAP_CHECKS, cached_blocks_hold_their_keys, pool_is_whole
from pagedkv.testing.machine import InvariantMachine
from pagedkv.testing.pool_machine import PICK

Slots = dict[int, tuple[int, ...]]
TOKENS = st.lists(st.integers(0, 1), min_size=1, max_size=14)


class PrefixCacheMachine(InvariantMachine):
    coverage: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.seqs: dict[int, list[int]] = {}  # resident sequence -> its tokens, all computed
        self.swapped: dict[int, list[int]] = {}  # swapped-out sequence -> its tokens
        self.kv_of: dict[int, tuple[int, ...]] = {}
        self.swap_of: dict[int, tuple[int, ...]] = {}
        self.next_id = 0

    def new_manager(self, num_blocks: int, block_size: int, num_swap_blocks: int) -> KVCacheManager:
        return KVCacheManager(num_blocks, block_size, enable_prefix_caching=True, num_swap_blocks=num_swap_blocks)

    @initialize(num_blocks=st.integers(2, 12), block_size=st.integers(1, 4), num_swap_blocks=st.integers(0, 8))
    def make(self, num_blocks: int, block_size: int, num_swap_blocks: int) -> None:
        self.kv = self.new_manager(num_blocks, block_size, num_swap_blocks)
        self.bs = block_size

    def pick(self, among: dict[int, list[int]], pick: int) -> int:
        live = sorted(among)
        return live[pick % len(live)]

    def compute(self, seq: int, start: int) -> None:
        """Write the stand-in K/V of tokens ``start..`` and register newly full blocks."""
        table = self.kv.table(seq)
        tokens = self.seqs[seq]
        for i in range(start, len(tokens)):
            self.kv_of[table.slot(i)] = tuple(tokens[: i + 1])
        self.kv.cache_full_blocks(seq, tokens, len(tokens))

    def copy(self, pairs: list[tuple[int, int]], src: Slots, dst: Slots) -> None:
        """What the executor does with a step's block copies, swap-outs and swap-ins."""
        for a, b in pairs:
            for j in range(self.bs):
                if a * self.bs + j in src:
                    dst[b * self.bs + j] = src[a * self.bs + j]

    @rule(tokens=TOKENS)
    def new_sequence(self, tokens: list[int]) -> None:
        hit = self.kv.find_prefix(tokens)
        before = self.kv.pool.snapshot()
        evictions = self.kv.pool.num_evictions
        self.next_id += 1
        if self.kv.allocate_slots(self.next_id, len(tokens), hit) is None:
            assert self.kv.pool.snapshot() == before and not self.kv.has(self.next_id)
            self.coverage["refused"] += 1
            return
        self.seqs[self.next_id] = tokens
        self.compute(self.next_id, len(hit.blocks) * self.bs)
        self.coverage["hit" if hit.blocks else "miss"] += 1
        self.coverage["evict"] += self.kv.pool.num_evictions > evictions

    @precondition(lambda self: self.seqs)
    @rule(pick=PICK, extra=st.lists(st.integers(0, 1), min_size=1, max_size=5))
    def append(self, pick: int, extra: list[int]) -> None:
        seq = self.pick(self.seqs, pick)
        start = len(self.seqs[seq])
        allocation = self.kv.allocate_slots(seq, start + len(extra))
        if allocation is None:
            return
        self.copy(allocation.copies, self.kv_of, self.kv_of)  # copy on write, before the step
        self.coverage["copy-on-write"] += bool(allocation.copies)
        self.seqs[seq] = self.seqs[seq] + extra
        self.compute(seq, start)

    @precondition(lambda self: self.seqs)
    @rule(pick=PICK)
    def fork(self, pick: int) -> None:
        parent = self.pick(self.seqs, pick)
        self.next_id += 1
        self.kv.fork(parent, self.next_id)
        self.seqs[self.next_id] = list(self.seqs[parent])
        self.coverage["fork"] += 1

    @precondition(lambda self: self.seqs)
    @rule(pick=PICK)
    def swap_out(self, pick: int) -> None:
        seq = self.pick(self.seqs, pick)
        before = self.kv.pool.snapshot(), self.kv.swap.num_free
        pairs = self.kv.swap_out(seq)
        if pairs is None:
            assert (self.kv.pool.snapshot(), self.kv.swap.num_free) == before and self.kv.has(seq)
            self.coverage["swap-refused"] += 1
            return
        self.copy(pairs, self.kv_of, self.swap_of)
        self.swapped[seq] = self.seqs.pop(seq)
        self.coverage["swap-out"] += 1

    @precondition(lambda self: self.swapped)
    @rule(pick=PICK)
    def swap_in(self, pick: int) -> None:
        seq = self.pick(self.swapped, pick)
        pairs = self.kv.swap_in(seq, len(self.swapped[seq]))
        if pairs is None:
            assert not self.kv.has(seq) and self.kv.swap.has(seq)
            return
        self.copy(pairs, self.swap_of, self.kv_of)
        self.seqs[seq] = self.swapped.pop(seq)
        self.kv.cache_full_blocks(seq, self.seqs[seq], len(self.seqs[seq]))  # as the scheduler does
        self.coverage["swap-in"] += 1

    @precondition(lambda self: self.seqs or self.swapped)
    @rule(pick=PICK)
    def free(self, pick: int) -> None:
        """Finish or abort a sequence, resident or swapped out."""
        seq = self.pick({**self.seqs, **self.swapped}, pick)
        self.kv.free(seq)
        self.seqs.pop(seq, None)
        self.swapped.pop(seq, None)
        assert not self.kv.has(seq) and not self.kv.swap.has(seq)

    @invariant()
    def catalogue_holds(self) -> None:
        contents = cached_blocks_hold_their_keys(lambda b: self.kv_of.get(b * self.bs + self.bs - 1))
        self.expect(POOL_CHECKS, self.kv.pool)
        self.expect(SWAP_CHECKS, self.kv.swap)
        self.expect([*KV_CHECKS, contents], self.kv)

    @invariant()
    def every_sequence_reads_the_kv_a_fresh_computation_gives(self) -> None:
        for seq, tokens in self.seqs.items():
            table = self.kv.table(seq)
            for i in range(len(tokens)):
                assert self.kv_of[table.slot(i)] == tuple(tokens[: i + 1]), f"sequence {seq} reads token {i} wrong"
        for seq, tokens in self.swapped.items():
            blocks = self.kv.swap.table(seq).blocks
            for i in range(len(tokens)):
                slot = blocks[i // self.bs] * self.bs + i % self.bs
                assert self.swap_of[slot] == tuple(tokens[: i + 1]), f"swapped sequence {seq} lost token {i}"

    def teardown(self) -> None:
        if hasattr(self, "kv"):
            for seq in [*self.seqs, *self.swapped]:
                self.kv.free(seq)
            self.expect([pool_is_whole, *KV_CHECKS], self.kv)
