"""Content hashes of full blocks, for automatic prefix caching.

A block's K/V depends on every token before it, not just its own, so its key chains the
parent block's key with its own token ids: two blocks have equal keys only if the whole
prefixes up to them are equal. The chain starts from a salt naming whatever else changes
K/V (the model and its dtype), so that caches of different models can never be confused.
SHA-256 from hashlib: stable across processes (Python's ``hash`` is salted per process)
and collision-free in practice; the pool still compares tokens on every hit.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import NamedTuple


def root_hash(salt: bytes = b"") -> bytes:
    """The parent key of a sequence's first block."""
    return hashlib.sha256(b"pagedkv-prefix\0" + salt).digest()


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class PrefixHit(NamedTuple):
    """The cached blocks that hold a sequence's leading full blocks, and their keys."""

    blocks: tuple[int, ...]
    hashes: tuple[bytes, ...]
    keys: tuple[bytes, ...] = ()
    """Every key of the sequence's leading blocks computed so far (at least ``hashes``): the
    caller keeps them and passes them to the next lookup, so a prompt is hashed once."""


NO_HIT = PrefixHit((), ())
