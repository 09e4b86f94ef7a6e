"""The same engine on a GPU: greedy tokens still equal the full recompute, and the pool can
be sized from a fraction of free GPU memory. Skipped cleanly where there is no CUDA."""

from __future__ import annotations

import pytest
import torch

from pagedkv.models import GPT, generate_no_cache
from pagedkv.scheduler import SamplingParams
from tests.helpers import random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def cuda_model():
    return GPT.from_preset("tiny", seed=0, device="cuda")


def test_cuda_engine_matches_reference_under_preemption(make_engine, cuda_model):
    prompts = random_prompts(seed=4, n=10, vocab=cuda_model.vocab_size, max_len=50)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    engine = make_engine(cuda_model, block_size=4, num_blocks=18, max_num_batched_tokens=32)
    outputs = engine.generate(prompts, params)
    assert [o.output_token_ids for o in outputs] == [generate_no_cache(cuda_model, p, 16) for p in prompts]
    assert engine.stats().num_preemptions > 0
    assert engine.executor.kv_cache.keys[0].is_cuda


def test_pool_from_a_fraction_of_free_gpu_memory(make_engine, cuda_model):
    engine = make_engine(cuda_model, block_size=16, gpu_memory_fraction=0.01)
    free, _ = torch.cuda.mem_get_info()
    per_block = cuda_model.kv_cache_spec().bytes_per_block(16)
    assert 0 < engine.kv_manager.num_blocks <= free * 0.01 // per_block + 1


def test_seeded_sampling_on_cuda_is_reproducible(make_engine, cuda_model):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True)
    first = make_engine(cuda_model, num_blocks=32).generate([[1, 2, 3]], params)[0].output_token_ids
    again = make_engine(cuda_model, num_blocks=32).generate([[1, 2, 3]], params)[0].output_token_ids
    assert first == again
