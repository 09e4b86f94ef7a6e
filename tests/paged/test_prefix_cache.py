"""Prefix caching in the allocator: unit cases for each detail that is easy to get wrong,
and pagedkv.testing's state machine whose sequences share prefixes, hit the cache, fork,
copy on write, evict and swap, with a stand-in for K/V that lets it check every cached
block's contents against its key."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

import pagedkv.paged.kv_manager
from pagedkv.paged import KVCacheManager
from pagedkv.paged.prefix import block_hash, root_hash
from pagedkv.testing import PrefixCacheMachine


def admit(kv: KVCacheManager, seq, tokens: list[int]):
    """What the scheduler does for a new sequence: find its prefix, allocate, compute, register."""
    hit = kv.find_prefix(tokens)
    allocation = kv.allocate_slots(seq, len(tokens), hit)
    if allocation is not None:
        kv.cache_full_blocks(seq, tokens, len(tokens))
    return hit, allocation


def test_hash_is_stable_across_processes():
    code = "from pagedkv.paged.prefix import block_hash, root_hash; print(block_hash(root_hash(b'm'), [1, 2, 3]).hex())"
    command = [sys.executable, "-c", code]
    runs = {subprocess.run(command, capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert runs == {block_hash(root_hash(b"m"), [1, 2, 3]).hex() + "\n"}


def test_key_chains_the_parent_and_the_salt():
    assert block_hash(root_hash(), [1, 2]) != block_hash(block_hash(root_hash(), [9, 9]), [1, 2])
    assert block_hash(root_hash(b"model-a"), [1, 2]) != block_hash(root_hash(b"model-b"), [1, 2])


def test_second_request_takes_the_shared_full_blocks_and_computes_the_rest():
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)
    admit(kv, "a", list(range(10)))  # blocks: [0-3] [4-7] [8 9 . .]
    hit, allocation = admit(kv, "b", [*range(8), 50, 51, 52])
    assert hit.blocks == kv.block_ids("a")[:2] and len(allocation.new_blocks) == 1
    assert kv.num_cached_blocks == 2  # partially filled blocks never enter the cache
    kv.check()


def test_a_full_hit_still_leaves_the_last_token_to_compute():
    kv = KVCacheManager(16, 4, enable_prefix_caching=True)
    admit(kv, "a", list(range(8)))
    assert kv.num_cached_blocks == 2
    hit = kv.find_prefix(list(range(8)))
    assert len(hit.blocks) == 1  # 4 cached tokens, 4 to compute: the last one's logits are needed


def test_freed_blocks_stay_cached_and_are_evicted_tail_first_least_recently_used():
    kv = KVCacheManager(4, 2, enable_prefix_caching=True)
    admit(kv, "a", [1, 2, 3, 4, 5, 6, 7])  # 3 full blocks cached + 1 partial
    head, mid, tail, partial = kv.block_ids("a")
    kv.free("a")
    assert kv.num_evictable_blocks == 3 and kv.num_free_blocks == 4
    x = kv.allocate_slots("x", 2)
    assert x is not None and x.new_blocks == [partial]  # uncached first: it was freed first
    assert kv.num_cached_blocks == 3
    y = kv.allocate_slots("y", 2)
    assert y is not None and y.new_blocks == [tail]  # then the chain's tail, not its head
    assert kv.num_cached_blocks == 2 and kv.pool.num_evictions == 1
    hit = kv.find_prefix([1, 2, 3, 4, 5, 6, 7])
    assert hit.blocks == (head, mid)  # the stale entry of the reused block is gone
    kv.check()


def test_a_hash_collision_never_serves_wrong_kv(monkeypatch):
    monkeypatch.setattr(pagedkv.paged.kv_manager, "block_hash", lambda parent, tokens: b"same")
    kv = KVCacheManager(8, 2, enable_prefix_caching=True)
    admit(kv, "a", [1, 2, 3])
    assert kv.find_prefix([9, 9, 9]).blocks == ()  # same key, different tokens: a miss
    assert kv.find_prefix([1, 2, 3]).blocks == kv.block_ids("a")[:1]


def test_identical_blocks_computed_in_the_same_step_keep_one_copy_of_record():
    kv = KVCacheManager(8, 2, enable_prefix_caching=True)
    for seq in "ab":  # both admitted before either step ran: no hit for b
        assert kv.allocate_slots(seq, 3, kv.find_prefix([1, 2, 3])) is not None
    for seq in "ab":
        kv.cache_full_blocks(seq, [1, 2, 3], 3)
    first = kv.block_ids("a")[0]
    assert kv.num_cached_blocks == 1 and kv.find_prefix([1, 2, 3]).blocks == (first,)
    kv.free("a")
    kv.free("b")  # b's private copy goes back uncached; a's stays findable
    assert kv.find_prefix([1, 2, 3]).blocks == (first,)
    kv.check()


def test_a_refused_prefix_allocation_changes_nothing():
    kv = KVCacheManager(3, 2, enable_prefix_caching=True)
    admit(kv, "a", [1, 2, 3, 4, 5])
    kv.free("a")  # 2 cached blocks evictable, 1 uncached, all free
    hit = kv.find_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9])
    before = kv.pool.snapshot()
    assert kv.allocate_slots("b", 9, hit) is None  # needs the 2 cached blocks + 3 new of 1 free
    assert kv.pool.snapshot() == before and not kv.has("b")


def test_caching_off_finds_nothing():
    kv = KVCacheManager(8, 2)
    admit(kv, "a", [1, 2, 3])
    assert kv.find_prefix([1, 2, 3]).blocks == () and kv.num_cached_blocks == 0


def test_prefix_cache_state_machine():
    PrefixCacheMachine.coverage.clear()
    run_state_machine_as_test(
        PrefixCacheMachine, settings=settings(max_examples=300, stateful_step_count=40, deadline=None)
    )
    for path in ("hit", "miss", "evict", "fork", "copy-on-write", "refused", "swap-out", "swap-in", "swap-refused"):
        assert PrefixCacheMachine.coverage[path] > 0, f"the state machine never exercised {path}"
