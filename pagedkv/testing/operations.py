"""Sequences of KV-manager operations as data: a strategy for them, and a function that
plays one on a manager and checks the catalogue after every operation. For a user's own
property test (``@given(kv_operations())``), without a state machine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hypothesis import strategies as st

from pagedkv.paged.invariants import Violation, kv_violations, pool_is_whole
from pagedkv.paged.kv_manager import KVCacheManager


@dataclass(frozen=True)
class Op:
    """One operation: ``new`` (a sequence of ``tokens`` slots), ``append`` (``tokens`` more
    slots), ``fork`` or ``free``; ``seq`` picks a live sequence, modulo how many there are."""

    kind: Literal["new", "append", "fork", "free"]
    seq: int = 0
    tokens: int = 0


def kv_operations(max_ops: int = 40) -> st.SearchStrategy[list[Op]]:
    seq = st.integers(0, 63)
    op = st.one_of(
        st.builds(Op, st.just("new"), st.just(0), st.integers(1, 30)),
        st.builds(Op, st.just("append"), seq, st.integers(1, 12)),
        st.builds(Op, st.just("fork"), seq),
        st.builds(Op, st.just("free"), seq),
    )
    return st.lists(op, max_size=max_ops)


def apply_operations(kv: KVCacheManager, ops: list[Op]) -> list[Violation]:
    """Play ``ops`` on ``kv`` (refused allocations are skipped), then free every sequence;
    return the violations found after the first operation that broke an invariant, or
    at the end (empty: every invariant held throughout, and the pool came back whole)."""
    live: list[int] = []
    for i, op in enumerate(ops):
        if op.kind == "new":
            if kv.allocate_slots(i, op.tokens) is not None:
                live.append(i)
        elif live:
            seq = live[op.seq % len(live)]
            if op.kind == "append":
                kv.allocate_slots(seq, kv.table(seq).num_tokens + op.tokens)
            elif op.kind == "fork":
                kv.fork(seq, i)
                live.append(i)
            else:
                kv.free(seq)
                live.remove(seq)
        found = kv_violations(kv)
        if found:
            return found
    for seq in live:
        kv.free(seq)
    whole = pool_is_whole(kv)
    return kv_violations(kv) + ([whole] if whole else [])
