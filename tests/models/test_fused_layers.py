"""The Llama layers as one C call each (``FusedLayers``, ``csrc/llama_layer.c``) give the same
logits and write the same cache as the modules, bit for bit, on steps that mix decodes and
prompt chunks over odd block sizes; and they stand aside wherever the kernels cannot take the
whole step."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from pagedkv.models.attention import PagedAttention
from pagedkv.models.cpu_kernel import load_cpu_kernel
from pagedkv.models.layers import KERNEL_ROWS
from pagedkv.models.llama import FusedLayers, Llama, LlamaConfig, LlamaDecoderLayer
from pagedkv.models.runner import prepare_inputs
from pagedkv.paged import blocks_for
from pagedkv.paged.kv_cache import KVCache
from pagedkv.scheduler.plan import ScheduledRequest, SchedulerOutput
from pagedkv.scheduler.request import Request
from pagedkv.scheduler.sampling_params import SamplingParams
from tests.helpers import needs_cpu_kernel

CONFIG = LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def step(rng: random.Random, block_size: int, lengths: list[tuple[int, int]]) -> tuple[SchedulerOutput, int]:
    """A plan of sequences with (cached, new) tokens, block tables scattered over a shuffled pool."""
    needed = [blocks_for(c + n, block_size) for c, n in lengths]
    pool = list(range(sum(needed) + 2))
    rng.shuffle(pool)
    scheduled, at = [], 0
    for i, ((cached, new), n_blocks) in enumerate(zip(lengths, needed, strict=True)):
        request = Request(f"r{i}", [rng.randrange(CONFIG.vocab_size) for _ in range(cached + new)], SamplingParams(),
                          arrival_time=0.0)
        scheduled.append(ScheduledRequest.of(request, cached, new, tuple(pool[at : at + n_blocks]), 1))
        at += n_blocks
    return SchedulerOutput(scheduled=scheduled), len(pool)


def forward(model: Llama, plan: SchedulerOutput, cache: KVCache) -> tuple[torch.Tensor, FusedLayers | None]:
    """The step's logits (every row) through the paged kernel path, and whether it fused."""
    inputs = prepare_inputs(plan, cache.block_size, torch.device("cpu"), decode_batch=False)
    attention = PagedAttention(cache, inputs.attention, load_cpu_kernel())
    with torch.inference_mode():
        fused = FusedLayers.of(model, model.embed_tokens(inputs.input_ids), model.rope(inputs.positions), attention)
        return model(inputs.input_ids, inputs.positions, attention), fused


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_fused_layers_equal_the_modules_bit_for_bit(dtype: torch.dtype, block_size: int) -> None:
    torch.manual_seed(block_size)
    model = Llama(CONFIG).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones, so that every norm's own weight counts
                weight.uniform_(0.5, 1.5)
    model = model.to(dtype)
    rng = random.Random(block_size)
    lengths = [(rng.randint(1, 60), 1) for _ in range(9)] + [(0, 17), (23, 6), (0, 1)]
    plan, num_blocks = step(rng, block_size, lengths)
    caches = [KVCache(model.kv_cache_spec(), num_blocks, block_size, "cpu") for _ in range(2)]
    for t in (*caches[0].keys, *caches[0].values):
        t.copy_(torch.randn(t.shape))  # cached context, and noise where nothing is
    for mine, theirs in zip((*caches[1].keys, *caches[1].values), (*caches[0].keys, *caches[0].values), strict=True):
        mine.copy_(theirs)

    fused_logits, fused = forward(model, plan, caches[0])
    model.fused_cpu_layers = False
    module_logits, _ = forward(model, plan, caches[1])

    kernels = load_cpu_kernel()
    assert kernels is not None
    if not kernels.supports_linear(dtype):
        assert fused is None  # no linear kernel for the dtype here: the modules run the step
    else:
        assert fused is not None
    assert torch.equal(fused_logits, module_logits)
    for mine, theirs in zip((*caches[0].keys, *caches[0].values), (*caches[1].keys, *caches[1].values), strict=True):
        assert torch.equal(mine, theirs)


@needs_cpu_kernel
def test_fused_layers_stand_aside_for_steps_the_kernels_do_not_take_whole() -> None:
    """More rows than the linear kernel takes (a long prompt chunk), the gather path, autograd."""
    model = Llama(CONFIG).eval()
    rng = random.Random(0)
    cases = {"chunk past the linear kernel's rows": [(0, KERNEL_ROWS + 1)], "decodes": [(5, 1), (9, 1)]}
    for name, lengths in cases.items():
        plan, num_blocks = step(rng, 4, lengths)
        cache = KVCache(model.kv_cache_spec(), num_blocks, 4, "cpu")
        inputs = prepare_inputs(plan, 4, torch.device("cpu"))
        with torch.inference_mode():
            x, rope = model.embed_tokens(inputs.input_ids), model.rope(inputs.positions)
            kernel_path = FusedLayers.of(model, x, rope, PagedAttention(cache, inputs.attention, load_cpu_kernel()))
            gather_path = FusedLayers.of(model, x, rope, PagedAttention(cache, inputs.attention, None))
        assert (kernel_path is not None) == (name == "decodes"), name
        assert gather_path is None, name
        x = model.embed_tokens(inputs.input_ids)  # autograd on: the kernels have no backward
        assert FusedLayers.of(model, x, model.rope(inputs.positions),
                              PagedAttention(cache, inputs.attention, load_cpu_kernel())) is None


@needs_cpu_kernel
def test_fused_layers_stand_aside_when_switched_off_or_a_module_is_swapped() -> None:
    """``fused_cpu_layers = False``, or a layer's Linear replaced by another kind of module (an
    adapter, say, whose forward the C call would skip): every layer runs through its modules."""
    model = Llama(CONFIG).eval()
    plan, num_blocks = step(random.Random(1), 4, [(5, 1), (9, 1)])
    cache = KVCache(model.kv_cache_spec(), num_blocks, 4, "cpu")
    inputs = prepare_inputs(plan, 4, torch.device("cpu"))
    attention = PagedAttention(cache, inputs.attention, load_cpu_kernel())

    def fused() -> FusedLayers | None:
        with torch.inference_mode():
            return FusedLayers.of(model, model.embed_tokens(inputs.input_ids), model.rope(inputs.positions), attention)

    assert fused() is not None
    model.fused_cpu_layers = False
    assert fused() is None
    model.fused_cpu_layers = True
    calls: list[int] = []
    block = model.layers[1]
    assert isinstance(block, LlamaDecoderLayer)
    original = block.mlp.down_proj

    class Adapter(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return original(x)

    block.mlp.down_proj = Adapter()  # type: ignore[assignment]
    assert fused() is None
    with torch.inference_mode():
        model(inputs.input_ids, inputs.positions, attention)
    assert calls == [2]  # the adapter ran, once, on the step's two rows


@needs_cpu_kernel
def test_a_slot_outside_the_cache_is_refused_before_anything_is_written() -> None:
    model = Llama(CONFIG).eval()
    plan, num_blocks = step(random.Random(2), 4, [(5, 1), (9, 1)])
    cache = KVCache(model.kv_cache_spec(), num_blocks, 4, "cpu")
    inputs = prepare_inputs(plan, 4, torch.device("cpu"))
    bad = dataclasses.replace(inputs.attention, slot_mapping=torch.tensor([3, num_blocks * 4]))
    before = [t.clone() for t in (*cache.keys, *cache.values)]
    attention = PagedAttention(cache, bad, load_cpu_kernel())
    with torch.inference_mode():
        assert FusedLayers.of(model, model.embed_tokens(inputs.input_ids), model.rope(inputs.positions), attention)
        with pytest.raises(ValueError, match="index out of range"):
            model(inputs.input_ids, inputs.positions, attention)
    assert all(torch.equal(a, b) for a, b in zip(before, (*cache.keys, *cache.values), strict=True))
