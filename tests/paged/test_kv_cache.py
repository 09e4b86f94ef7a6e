"""The K/V tensors: their shape, the bytes-per-block formula, sizing from a budget, copies."""

from __future__ import annotations

import pytest
import torch

from pagedkv.paged.kv_cache import KVCache, KVCacheSpec, resolve_num_blocks

SPEC = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float32)
CPU = torch.device("cpu")


def test_bytes_per_block_formula():
    assert SPEC.bytes_per_block(16) == 2 * 3 * 16 * 2 * 8 * 4
    half = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
    assert half.bytes_per_block(16) == SPEC.bytes_per_block(16) // 2


def test_tensors_have_the_paged_shape_and_the_advertised_size():
    cache = KVCache(SPEC, num_blocks=5, block_size=4, device=CPU)
    assert len(cache.keys) == len(cache.values) == 3
    for t in (*cache.keys, *cache.values):
        assert t.shape == (5, 4, 2, 8) and t.dtype == torch.float32 and not t.any()
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values))


def test_num_blocks_from_a_byte_budget():
    per_block = SPEC.bytes_per_block(4)
    assert resolve_num_blocks(SPEC, 4, CPU, memory_bytes=10 * per_block + per_block - 1) == 10
    assert resolve_num_blocks(SPEC, 4, CPU, num_blocks=7) == 7
    with pytest.raises(ValueError, match="holds no block"):
        resolve_num_blocks(SPEC, 4, CPU, memory_bytes=per_block - 1)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_num_blocks(SPEC, 4, CPU, gpu_memory_fraction=0.5)


def test_engine_sizes_its_pool_from_the_budget(make_engine, tiny_model):
    per_block = tiny_model.kv_cache_spec().bytes_per_block(8)
    engine = make_engine(block_size=8, kv_cache_memory_bytes=20 * per_block)
    assert engine.kv_manager.num_blocks == 20 == engine.executor.kv_cache.num_blocks
    assert make_engine(block_size=8).kv_manager.num_blocks == 256 * 2**20 // per_block  # the default budget


def test_copy_blocks_copies_every_layer():
    cache = KVCache(SPEC, num_blocks=4, block_size=2, device=CPU)
    for t in (*cache.keys, *cache.values):
        t.copy_(torch.randn_like(t))
    before = [t.clone() for t in (*cache.keys, *cache.values)]
    cache.copy_blocks([(0, 3), (1, 2)])
    for old, new in zip(before, (*cache.keys, *cache.values), strict=True):
        assert torch.equal(new[3], old[0]) and torch.equal(new[2], old[1])
        assert torch.equal(new[:2], old[:2])
