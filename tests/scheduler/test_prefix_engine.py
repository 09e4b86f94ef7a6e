"""Prefix caching in the engine: greedy tokens equal the full-recompute reference with the
cache on and off, for heavily shared prompts (prefixes ending mid-block, identical prompts,
a second wave that finds the first wave's blocks freed but cached) and for pools small
enough to evict and preempt; and the K/V served from the cache equals the K/V a fresh
computation writes."""

from __future__ import annotations

import random

import pytest
import torch

from pagedkv.models import generate_no_cache
from pagedkv.paged import blocks_for
from pagedkv.scheduler import SamplingParams


@pytest.fixture(scope="module")
def shared(tiny_model):
    """16 prompts in 3 groups sharing prefixes of 13, 16 and 29 tokens (mid-block for most
    block sizes), with suffixes of 0-9 tokens (empty suffixes make identical prompts)."""
    rng = random.Random(5)
    prefixes = [[rng.randrange(tiny_model.vocab_size) for _ in range(n)] for n in (13, 16, 29)]
    prompts = [prefixes[i % 3] + [rng.randrange(tiny_model.vocab_size) for _ in range(rng.choice([0, 1, 3, 9]))]
               for i in range(16)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 12), ignore_eos=True) for _ in prompts]
    expected = [generate_no_cache(tiny_model, p, sp.max_tokens) for p, sp in zip(prompts, params, strict=True)]
    return prompts, params, expected


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("budget", [1024, 7])
def test_shared_prompts_match_the_reference_in_two_waves(make_engine, shared, caching, block_size, budget):
    prompts, params, expected = shared
    engine = make_engine(block_size=block_size, num_blocks=256, max_num_batched_tokens=budget,
                         enable_prefix_caching=caching)
    for _wave in range(2):  # the second wave finds every full block of the first one cached
        assert [o.output_token_ids for o in engine.generate(prompts, params)] == expected
    stats = engine.stats()
    if not caching:
        assert stats.num_prefix_hit_tokens == 0 and stats.kv_blocks_cached == 0
        return
    assert stats.kv_blocks_cached > 0 and stats.kv_blocks_evictable == stats.kv_blocks_cached
    # The second wave alone could serve every full block of its prompts but the last token's.
    second_wave_max = sum((len(p) - 1) // block_size * block_size for p in prompts)
    assert stats.num_prefix_hit_tokens >= second_wave_max
    assert 0 < stats.prefix_hit_rate < 1


@pytest.mark.parametrize("block_size", [1, 4])
def test_a_tiny_pool_evicts_and_preempts_and_still_matches(make_engine, shared, block_size):
    prompts, params, expected = shared
    smallest = max(blocks_for(len(p) + sp.max_tokens - 1, block_size) for p, sp in zip(prompts, params, strict=True))
    engine = make_engine(block_size=block_size, num_blocks=smallest, max_num_batched_tokens=9)
    for _ in range(2):
        assert [o.output_token_ids for o in engine.generate(prompts, params)] == expected
    assert engine.kv_manager.pool.num_evictions > 0 and engine.stats().num_preemptions > 0
    assert engine.stats().num_prefix_hit_tokens > 0


def test_kv_served_from_the_cache_equals_a_fresh_computation(make_engine, shared):
    prompts, params, _ = shared
    cached = make_engine(block_size=4, num_blocks=256)
    cached.generate(prompts, params)
    prompt = prompts[2]  # the 29-token prefix group
    hit = cached.kv_manager.find_prefix(prompt)
    assert len(hit.blocks) == (len(prompt) - 1) // 4
    fresh = make_engine(block_size=4, num_blocks=256, enable_prefix_caching=False)
    fresh.generate([prompt], [SamplingParams(temperature=0.0, max_tokens=1)])  # a fresh pool hands out 0, 1, 2, ...
    a, b = cached.executor.kv_cache, fresh.executor.kv_cache
    for layer in range(len(a.keys)):
        for i, block in enumerate(hit.blocks):
            torch.testing.assert_close(a.keys[layer][block], b.keys[layer][i], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.values[layer][block], b.values[layer][i], rtol=1e-5, atol=1e-5)


def test_requests_admitted_in_the_same_step_share_the_prefix(make_engine, tiny_model):
    """Blocks are registered when the step that fills them is scheduled, so the second and
    later requests of that very step compute only their suffixes, and read the prefix's
    K/V that the same forward pass writes."""
    rng = random.Random(9)
    prefix = [rng.randrange(tiny_model.vocab_size) for _ in range(32)]
    prompts = [prefix + [rng.randrange(tiny_model.vocab_size) for _ in range(3 + i)] for i in range(4)]
    engine = make_engine(block_size=4, num_blocks=128)
    plans, schedule = [], engine.scheduler.schedule

    def recording_schedule():
        plans.append(schedule())
        return plans[-1]

    engine.scheduler.schedule = recording_schedule
    outs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert [o.output_token_ids for o in outs] == [generate_no_cache(tiny_model, p, 5) for p in prompts]
    assert [(s.start, s.num_new_tokens) for s in plans[0].scheduled] == [(0, 35)] + [(32, 4 + i) for i in range(3)]
    assert engine.stats().num_prefix_hit_tokens == 3 * 32
