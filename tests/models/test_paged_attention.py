"""Paged attention equals dense causal attention over each sequence's own tokens, for any
mix of decode rows and prefill chunks (with or without cached context), any block size,
MHA or GQA, and block tables scattered over a shuffled pool; and the step's new K/V land in
exactly their slots, touching nothing else in the cache."""

from __future__ import annotations

import functools
import platform
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pagedkv.models.attention import PagedAttention, attend, causal_mask, gather
from pagedkv.models.cpu_kernel import CPUKernels, build_cpu_kernels, load_cpu_kernel
from pagedkv.models.runner import prepare_inputs
from pagedkv.paged import blocks_for
from pagedkv.paged.kv_cache import KVCache, KVCacheSpec
from pagedkv.scheduler.plan import ScheduledRequest, SchedulerOutput
from pagedkv.scheduler.request import Request
from pagedkv.scheduler.sampling_params import SamplingParams
from tests.helpers import ATTENTION_BACKENDS, needs_cpu_kernel

HEAD_DIM = 8
NUM_LAYERS = 2
CASES_PER_CONFIG = 10
TOLERANCE = 1e-5


@dataclass
class Seq:
    """One sequence of a step: ``cached`` tokens already in the cache, ``new`` computed now."""

    cached: int
    new: int
    blocks: list[int]
    keys: torch.Tensor  # [cached + new, Hkv, D], the whole sequence
    values: torch.Tensor
    queries: torch.Tensor  # [new, H, D]

    @property
    def kind(self) -> str:
        if self.new == 1:
            return "decode" if self.cached else "single-token prompt"
        return "chunk after cache" if self.cached else "fresh chunk"

    def slots(self, block_size: int, start: int, end: int) -> torch.Tensor:
        """Flat cache slots of tokens ``[start, end)``, straight from the block-table formula."""
        slots = [self.blocks[i // block_size] * block_size + i % block_size for i in range(start, end)]
        return torch.tensor(slots, dtype=torch.long)


def random_lengths(rng: random.Random) -> tuple[int, int]:
    """(cached, new) for one sequence: a decode, a chunk on top of cached context, a fresh
    multi-token prompt, or a one-token prompt."""
    kind = rng.choices(["decode", "cached-chunk", "fresh-chunk", "fresh-single"], weights=[4, 3, 3, 1])[0]
    if kind == "decode":
        return rng.randint(1, 40), 1
    if kind == "cached-chunk":
        return rng.randint(1, 40), rng.randint(2, 20)
    if kind == "fresh-chunk":
        return 0, rng.randint(2, 30)
    return 0, 1


def make_step(
    rng: random.Random,
    gen: torch.Generator,
    block_size: int,
    heads: int,
    kv_heads: int,
    lengths: list[tuple[int, int]] | None = None,
) -> tuple[list[Seq], int]:
    """Sequences (random 1..6 unless ``lengths`` given) whose block tables are disjoint
    slices of a shuffled pool with a few spare blocks, so tables are non-contiguous and
    unordered. Returns them and the pool size."""
    if lengths is None:
        lengths = [random_lengths(rng) for _ in range(rng.randint(1, 6))]
    needed = [blocks_for(c + n, block_size) for c, n in lengths]
    num_blocks = sum(needed) + rng.randint(0, 3)
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    seqs, at = [], 0
    for (cached, new), n_blocks in zip(lengths, needed, strict=True):
        total = cached + new
        seqs.append(
            Seq(
                cached=cached,
                new=new,
                blocks=pool[at : at + n_blocks],
                keys=torch.randn(total, kv_heads, HEAD_DIM, generator=gen),
                values=torch.randn(total, kv_heads, HEAD_DIM, generator=gen),
                queries=torch.randn(new, heads, HEAD_DIM, generator=gen),
            )
        )
        at += n_blocks
    return seqs, num_blocks


def reference(seq: Seq, heads: int) -> torch.Tensor:
    """Dense causal attention of the new queries over the whole sequence, last query aligned
    to the last key; K/V heads repeated for grouped-query attention."""
    group = heads // seq.keys.shape[1]
    k = seq.keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
    v = seq.values.repeat_interleave(group, dim=1).transpose(0, 1)
    q = seq.queries.transpose(0, 1)  # [H, new, D]
    total = seq.cached + seq.new
    mask = torch.arange(total)[None, :] <= torch.arange(seq.cached, total)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1)


def plan_for(seqs: list[Seq]) -> SchedulerOutput:
    """A one-step plan: each sequence computes its new tokens on top of its cached ones."""
    scheduled = []
    for i, s in enumerate(seqs):
        request = Request(f"r{i}", [i % 7] * (s.cached + s.new), SamplingParams(), arrival_time=0.0)
        scheduled.append(ScheduledRequest.of(request, s.cached, s.new, tuple(s.blocks), 1))
    return SchedulerOutput(scheduled=scheduled)


def run_case(
    seed: int, block_size: int, heads: int, kv_heads: int, lengths: list[tuple[int, int]] | None = None,
    backend: str = "gather",
) -> set[str]:
    """One step checked end to end through one attention path; returns which kinds of
    sequences it contained."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    seqs, num_blocks = make_step(rng, gen, block_size, heads, kv_heads, lengths)
    cache = KVCache(KVCacheSpec(NUM_LAYERS, kv_heads, HEAD_DIM, torch.float32), num_blocks, block_size, "cpu")
    layer = rng.randrange(NUM_LAYERS)
    # Finite noise everywhere: padded or unused slots must be masked out, not merely zero.
    for t in (*cache.keys, *cache.values):
        t.copy_(torch.randn(t.shape, generator=gen))
    for s in seqs:
        slots = s.slots(block_size, 0, s.cached)
        cache.keys[layer].view(-1, kv_heads, HEAD_DIM)[slots] = s.keys[: s.cached]
        cache.values[layer].view(-1, kv_heads, HEAD_DIM)[slots] = s.values[: s.cached]
    expected_keys = [t.clone() for t in cache.keys]
    expected_values = [t.clone() for t in cache.values]
    for s in seqs:
        slots = s.slots(block_size, s.cached, s.cached + s.new)
        expected_keys[layer].view(-1, kv_heads, HEAD_DIM)[slots] = s.keys[s.cached :]
        expected_values[layer].view(-1, kv_heads, HEAD_DIM)[slots] = s.values[s.cached :]

    inputs = prepare_inputs(plan_for(seqs), block_size, torch.device("cpu"))
    q = torch.cat([s.queries for s in seqs])
    k = torch.cat([s.keys[s.cached :] for s in seqs])
    v = torch.cat([s.values[s.cached :] for s in seqs])
    kernel = load_cpu_kernel() if backend == "kernel" else None
    out = PagedAttention(cache, inputs.attention, kernel)(layer, q, k, v)

    expected = torch.cat([reference(s, heads) for s in seqs])
    error = (out - expected).abs().max().item()
    kinds = [s.kind for s in seqs]
    assert error <= TOLERANCE, f"seed {seed}: max error {error:.2e} for {kinds}"
    for got, want in zip((*cache.keys, *cache.values), (*expected_keys, *expected_values), strict=True):
        assert torch.equal(got, want), f"seed {seed}: cache differs from 'new K/V in their slots only'"
    return set(kinds)


@ATTENTION_BACKENDS
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_paged_attention_matches_dense(block_size: int, heads: int, kv_heads: int, backend: str) -> None:
    """Over many random steps, every output row equals the dense reference (<= 1e-5) and
    the cache afterwards holds the old contents plus the new K/V at their slots; the steps
    covered decodes, chunks on top of a cache and fresh chunks."""
    seen: set[str] = set()
    for case in range(CASES_PER_CONFIG):
        seen |= run_case(1000 * block_size + 10 * heads + case, block_size, heads, kv_heads, backend=backend)
    assert {"decode", "chunk after cache", "fresh chunk"} <= seen, seen


@ATTENTION_BACKENDS
@pytest.mark.parametrize("seed", range(4))
def test_only_decodes_and_one_long_chunk(seed: int, backend: str) -> None:
    """Each path on its own: a batch of decodes only (one padded gather or one kernel call),
    and a lone chunk spanning many blocks on top of a long cached prefix."""
    rng = random.Random(seed)
    assert run_case(seed, 4, 4, 2, [(rng.randint(1, 50), 1) for _ in range(6)], backend) == {"decode"}
    assert run_case(seed, 4, 4, 2, [(rng.randint(17, 60), rng.randint(2, 40))], backend) == {"chunk after cache"}


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("queries, keys", [(1, 37), (5, 40), (12, 12)])
def test_reduced_precision_cpu_path_matches_float32(heads: int, kv_heads: int, queries: int, keys: int) -> None:
    """bfloat16 on the CPU goes through grouped matmuls instead of the fused kernel; it must
    compute the same attention (to bfloat16's precision) for decode rows and prefill chunks."""
    g = torch.Generator().manual_seed(queries * 100 + keys)
    q = torch.randn(3, queries, heads, 16, generator=g)
    k = torch.randn(3, keys, kv_heads, 16, generator=g)
    v = torch.randn(3, keys, kv_heads, 16, generator=g)
    lengths = torch.tensor([keys, keys - 1, max(queries, keys // 2)])
    visible = torch.arange(keys)[None, :] < lengths[:, None]  # per-row padding, as in a decode gather
    mask = causal_mask(queries, keys, q.device) & visible[:, None, :]
    expected = attend(q, k, v, mask)
    got = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max() < 0.05


@functools.cache
def kernel_build(build: str) -> CPUKernels:
    """The kernels as this CPU runs them ("native"), or built without AVX512-BF16 so that the
    conversion path other CPUs take for bfloat16 scores is tested here too."""
    if build == "native":
        kernel = load_cpu_kernel()
        assert kernel is not None
        return kernel
    if platform.machine() != "x86_64" or "avx512_bf16" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX512-BF16: the native build already takes the other path")
    return build_cpu_kernels(["-mno-avx512bf16"])


@needs_cpu_kernel
@pytest.mark.parametrize("build", ["native", "no-avx512bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("block_size", "heads", "kv_heads", "head_dim"),
                         [(1, 4, 4, 8), (16, 9, 3, 64), (5, 6, 2, 32), (3, 16, 2, 32), (16, 4, 4, 128), (32, 6, 2, 24),
                          (16, 4, 2, 256)])  # the last: groups of 2, a head size past the vector paths' constants
@pytest.mark.parametrize(("new", "context"), [
    ([1, 1, 3, 1, 7, 1], [1, 90, 40, 33, 7, 150]),
    ([40, 23, 16, 1, 17, 6], [40, 100, 17, 60, 17, 50]),  # tiles of 16+ rows per K/V head: rows in lanes
], ids=["decodes", "chunks"])
def test_kernel_matches_gather_path_in_each_dtype(build: str, dtype: torch.dtype, block_size: int, heads: int,
                                                  kv_heads: int, head_dim: int, new: list[int],
                                                  context: list[int]) -> None:
    """The kernel against the gather path on the same cache, in the model's dtype: float32
    within 1e-5, bfloat16 within 2e-2 (both round their output to bfloat16 once; the kernel
    accumulates in float32, the gather path's matmuls in bfloat16). Sequences read blocks
    scattered over the pool; several new tokens per sequence are causal among themselves;
    rows of the output that no sequence names are left untouched. The chunks take both of the
    kernel's layouts: one row per query (few rows per K/V head) and rows in vector lanes (16 or
    more: one to eight row vectors, contexts off the 16-key chunks, tiles split from 40 tokens)."""
    g = torch.Generator().manual_seed(block_size * 100 + heads)
    num_blocks = 200
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    width = -(-max(context) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in new])
    starts = torch.tensor([0, *new]).cumsum(0)[:-1]
    # two rows nobody names; q a slice of a wider tensor, as of the fused QKV output
    q = torch.randn(sum(new) + 2, heads + 2, head_dim, generator=g).to(dtype)[:, :heads]
    out = torch.full(q.shape, 7.0, dtype=dtype)
    kernel_build(build).paged_attention(q, k_cache, v_cache, out, tables, starts, torch.tensor(new),
                                        torch.tensor(context))

    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (n, c) in enumerate(zip(new, context, strict=True)):
        keys = gather(k_cache, tables[i, : -(-c // block_size)])[:c]
        values = gather(v_cache, tables[i, : -(-c // block_size)])[:c]
        rows = slice(int(starts[i]), int(starts[i]) + n)
        expected = attend(q[rows].float(), keys.float(), values.float())
        assert (out[rows].float() - expected).abs().max() <= tolerance, f"sequence {i}"
    assert torch.equal(out[-2:], torch.full_like(out[-2:], 7.0))


@needs_cpu_kernel
@pytest.mark.parametrize("build", ["native", "no-avx512bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [5, 16, 32])
def test_kernel_never_reads_past_the_context(build: str, dtype: torch.dtype, block_size: int) -> None:
    """Cache slots past each sequence's context (the tail of its last block, and every block
    it does not own) hold NaN: nothing of them reaches the output, though the kernel reads
    whole 16-token chunks in place. Odd and even contexts, decodes and a short chunk."""
    g = torch.Generator().manual_seed(block_size)
    heads, kv_heads, head_dim = 9, 3, 64
    new, context = [1, 1, 1, 3], [1, 33, 48, 21]
    widths = [-(-c // block_size) for c in context]
    num_blocks = sum(widths) + 3
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(new), max(widths), dtype=torch.int64)
    for i, (c, w) in enumerate(zip(context, widths, strict=True)):
        tables[i, :w] = torch.tensor(order[:w])
        del order[:w]
        for t in range(c):  # this sequence's own tokens, nothing else
            block, offset = int(tables[i, t // block_size]), t % block_size
            k_cache[block, offset] = torch.randn(kv_heads, head_dim, generator=g).to(dtype)
            v_cache[block, offset] = torch.randn(kv_heads, head_dim, generator=g).to(dtype)
    starts = torch.tensor([0, *new]).cumsum(0)[:-1]
    q = torch.randn(sum(new), heads, head_dim, generator=g).to(dtype)
    out = torch.empty_like(q)
    kernel_build(build).paged_attention(q, k_cache, v_cache, out, tables, starts, torch.tensor(new),
                                        torch.tensor(context))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (n, c) in enumerate(zip(new, context, strict=True)):
        keys = gather(k_cache, tables[i, : widths[i]])[:c]
        values = gather(v_cache, tables[i, : widths[i]])[:c]
        rows = slice(int(starts[i]), int(starts[i]) + n)
        expected = attend(q[rows].float(), keys.float(), values.float())
        assert (out[rows].float() - expected).abs().max() <= tolerance, f"sequence {i}"


def test_attention_backend_choices(tiny_model) -> None:
    """'auto' takes the kernel where it applies and the gather path elsewhere; 'kernel' where
    it cannot run and an unknown name are refused, naming the field."""
    from copy import deepcopy

    from pagedkv.errors import InvalidRequestError
    from pagedkv.models import ModelRunner

    half = deepcopy(tiny_model).half()
    assert ModelRunner(half, "auto", adapt_threads=False).attention_kernel is None
    assert ModelRunner(tiny_model, "gather", adapt_threads=False).attention_kernel is None
    for model, backend in [(half, "kernel"), (tiny_model, "fused")]:
        with pytest.raises(InvalidRequestError) as refused:
            ModelRunner(model, backend, adapt_threads=False)  # type: ignore[arg-type]
        assert refused.value.param == "attention_backend"


@needs_cpu_kernel
def test_kernel_refuses_indices_outside_its_tensors() -> None:
    """Metadata that would read or write outside q, out or the cache is a ValueError, checked
    before any memory is touched; nothing is written."""
    kernel = load_cpu_kernel()
    assert kernel is not None
    k_cache = torch.zeros(4, 4, 2, 8)
    q = torch.randn(3, 4, 8)
    good = dict(block_tables=torch.tensor([[0, 1]]), query_starts=torch.tensor([0]), query_lens=torch.tensor([3]),
                context_lens=torch.tensor([5]))
    bad = [
        {"context_lens": torch.tensor([2])},  # context shorter than its new tokens
        {"block_tables": torch.tensor([[0, 4]])},  # block id past the pool
        {"context_lens": torch.tensor([9])},  # more tokens than its table holds
        {"query_starts": torch.tensor([1])},  # new tokens past the end of q
        {"block_tables": torch.tensor([[0, 1]], dtype=torch.int32)},  # not int64
    ]
    for change in bad:
        out = torch.full_like(q, 7.0)
        with pytest.raises(ValueError):
            kernel.paged_attention(q, k_cache, k_cache, out, **{**good, **change})
        assert torch.equal(out, torch.full_like(q, 7.0))
    out = torch.empty_like(q)
    kernel.paged_attention(q, k_cache, k_cache, out, **good)  # the good one runs
