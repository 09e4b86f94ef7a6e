"""Every check of the bookkeeping's invariant catalogue holds on healthy state and, on state
broken the way its bug class breaks it, names itself and the offending block or sequence (so
no check is vacuous, including those no mutant of benchmarks/mutation_score.py trips first)."""

from __future__ import annotations

import pytest

from pagedkv.paged import BlockPoolError, KVCacheManager
from pagedkv.testing import invariants as inv


def healthy_kv() -> KVCacheManager:
    kv = KVCacheManager(8, 2, enable_prefix_caching=True, num_swap_blocks=4)
    kv.allocate_slots("a", 5)
    kv.cache_full_blocks("a", [1, 2, 3, 4, 5], 5)
    kv.fork("a", "b")
    kv.allocate_slots("c", 3)
    kv.swap_out("c")
    return kv


def test_healthy_state_has_no_violations() -> None:
    kv = healthy_kv()
    assert inv.kv_violations(kv) == []
    kv.check()


# Each breaks the state as its bug would, reaching into privates, and returns the culprit block.


def _ref_count_on_a_free_block(kv: KVCacheManager) -> int:
    block = kv.pool.snapshot().free_order[0]
    kv.pool.ref_counts[block] = 1
    return block


def _stale_index_entry(kv: KVCacheManager) -> int:
    block = kv.pool.snapshot().free_order[0]
    kv.pool._cached[b"stale"] = block
    return block


def _swap_block_twice(kv: KVCacheManager) -> int:
    block = kv.swap.table("c").blocks[0]
    kv.swap._free.append(block)
    return block


def _extra_reference(kv: KVCacheManager) -> int:
    kv.pool.incref([0])
    return 0


@pytest.mark.parametrize(("break_it", "check", "blamed", "seq"), [
    (_ref_count_on_a_free_block, inv.free_xor_referenced, True, None),
    (_ref_count_on_a_free_block, inv.free_plus_used_is_total, False, None),
    (_stale_index_entry, inv.prefix_index_matches_keys, True, None),
    (_swap_block_twice, inv.swap_blocks_partitioned, True, None),
    (_extra_reference, inv.ref_count_is_number_of_holders, True, None),
    (lambda kv: setattr(kv.table("b"), "num_tokens", 7), inv.tables_fit_their_tokens, False, "b"),
    (lambda kv: setattr(kv, "_stored", kv.num_stored_tokens + 1), inv.stored_tokens_add_up, False, None),
    (lambda kv: kv.swap.store("a", 1, 1), inv.resident_xor_swapped, False, "a"),
])
def test_each_check_names_itself_and_the_culprit(break_it, check, blamed, seq) -> None:
    """``blamed``: the check names the block the breakage returned (else no block)."""
    kv = healthy_kv()
    culprit = break_it(kv)
    block = culprit if blamed else None
    subject = {"free_xor_referenced": kv.pool, "free_plus_used_is_total": kv.pool, "prefix_index_matches_keys": kv.pool,
               "swap_blocks_partitioned": kv.swap}.get(check.__name__, kv)
    found = check(subject)
    assert found is not None and found.invariant == check.__name__
    assert (found.block, found.request) == (block, seq), found
    assert found in inv.kv_violations(kv)
    with pytest.raises(BlockPoolError):
        kv.check()


def test_pool_is_whole_and_cached_contents() -> None:
    kv = healthy_kv()
    leak = inv.pool_is_whole(kv)
    assert leak is not None and leak.request == "a"
    for seq in ("a", "b", "c"):
        kv.free(seq)
    assert inv.pool_is_whole(kv) is None
    kv = KVCacheManager(4, 2, enable_prefix_caching=True)
    kv.allocate_slots("d", 2)
    kv.cache_full_blocks("d", [1, 2], 2)
    (block,) = kv.block_ids("d")
    assert inv.cached_blocks_hold_their_keys(lambda b: (1, 2))(kv) is None
    found = inv.cached_blocks_hold_their_keys(lambda b: (9, 2))(kv)
    assert found is not None and found.invariant == "cached_blocks_hold_their_keys" and found.block == block
