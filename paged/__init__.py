"""Paged K/V memory: a ref-counted block pool, per-sequence block tables, and the tensors.

The bookkeeping (``BlockPool``, ``BlockTable``, ``KVCacheManager``) is pure Python; only
``pagedkv.paged.kv_cache`` imports torch, and it is not imported here so the simulator stays
torch-free.
"""

from pagedkv.paged.block_pool import BlockPool, BlockPoolError, PoolSnapshot
from pagedkv.paged.block_table import BlockTable, blocks_for
from pagedkv.paged.kv_manager import Allocation, KVCacheManager
from pagedkv.paged.swap import SwapSpace, SwapSpaceError

__all__ = [
    "Allocation",
    "BlockPool",
    "BlockPoolError",
    "BlockTable",
    "KVCacheManager",
    "PoolSnapshot",
    "SwapSpace",
    "SwapSpaceError",
    "blocks_for",
]
