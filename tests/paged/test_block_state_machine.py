"""The KV cache manager's state machine (pool and block tables), from pagedkv.testing:
the invariants hold along every explored run, and the runs took the paths that matter."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis.stateful import run_state_machine_as_test

from pagedkv.paged import KVCacheManager
from pagedkv.testing import KVManagerMachine
from pagedkv.testing.operations import apply_operations, kv_operations


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


@settings(max_examples=50, deadline=None)
@given(ops=kv_operations())
def test_operation_sequences_keep_the_catalogue(ops) -> None:
    assert apply_operations(KVCacheManager(6, 2), ops) == []
