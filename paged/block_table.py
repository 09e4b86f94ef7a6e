"""Per-sequence block tables: the map from a sequence's token positions to K/V slots."""

from __future__ import annotations

from dataclasses import dataclass


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens (ceiling division)."""
    return -(-num_tokens // block_size)


@dataclass(slots=True)
class BlockTable:
    """The blocks one sequence holds, in logical order, and how many token slots it uses.

    Token ``i`` of the sequence lives in slot
    ``blocks[i // block_size] * block_size + i % block_size`` of the flattened K/V cache.
    ``num_tokens`` counts the slots handed out so far; only the last block can be
    partially filled. ``blocks`` is a tuple, replaced (not mutated) when it grows: a plan
    can hold it as a value without copying it every step. ``hashes`` are the prefix-cache
    keys of the leading full blocks whose K/V is known (computed or taken from the cache).
    """

    block_size: int
    blocks: tuple[int, ...] = ()
    num_tokens: int = 0
    hashes: tuple[bytes, ...] = ()

    def slot(self, i: int) -> int:
        if not 0 <= i < self.num_tokens:
            raise IndexError(f"token {i} is outside this table's {self.num_tokens} tokens")
        return self.blocks[i // self.block_size] * self.block_size + i % self.block_size

    @property
    def last_block_partial(self) -> bool:
        """True when the last block has free slots that the next token will write into."""
        return self.num_tokens % self.block_size != 0
