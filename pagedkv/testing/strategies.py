"""Hypothesis strategies for the engine's inputs: prompts, sampling parameters, requests
and engine configurations (sequences of KV-manager operations: :mod:`pagedkv.testing.operations`).

They draw small values on purpose: short prompts over a tiny vocabulary (so prefixes
collide and the prefix cache hits), pools of a few blocks (so allocations are refused and
requests preempted), budgets of a few tokens (so prefills are chunked). Bugs in the
bookkeeping live at those edges, and hypothesis shrinks a failure towards the smallest.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from pagedkv.paged.block_table import blocks_for
from pagedkv.scheduler.config import EngineConfig
from pagedkv.scheduler.sampling_params import SamplingParams

VOCAB = 64
"""Token ids are drawn below this (the stand-in executor's vocabulary)."""


def prompts(min_len: int = 1, max_len: int = 24, vocab: int = VOCAB) -> st.SearchStrategy[list[int]]:
    """Token-id prompts; a third of them repeat one token, so that they share prefixes."""
    sizes = st.integers(min_len, max_len)
    shared = st.builds(lambda n: [7] * n, sizes)
    return st.one_of(shared, st.lists(st.integers(0, vocab - 1), min_size=min_len, max_size=max_len), shared)


def sampling_params(max_n: int = 4, max_tokens: int = 12, vocab: int = VOCAB) -> st.SearchStrategy[SamplingParams]:
    """Random-sampling parameters that end by length or a stop token (never EOS: the
    stand-in executor has none), with ``n`` up to ``max_n`` (parallel sampling forks)."""
    return st.builds(
        lambda n, tokens, stops, seed: SamplingParams(
            temperature=1.0, n=n, max_tokens=tokens, ignore_eos=True, stop_token_ids=stops, seed=seed
        ),
        st.integers(1, max_n),
        st.integers(1, max_tokens),
        st.lists(st.integers(0, vocab - 1), max_size=2),
        st.none() | st.integers(0, 2**16),
    )


@dataclass(frozen=True)
class RequestSpec:
    """One request to add: ``engine.add_request(id, spec.prompt, spec.params, priority=spec.priority)``."""

    prompt: list[int]
    params: SamplingParams
    priority: int = 0


def requests(max_len: int = 40, max_n: int = 4) -> st.SearchStrategy[RequestSpec]:
    """Requests whose prompt plus ``max_tokens`` fit ``max_len`` tokens, with priorities 0-2."""
    return st.builds(
        RequestSpec,
        prompts(max_len=max(1, max_len * 3 // 5)),
        sampling_params(max_n=max_n, max_tokens=max(1, max_len * 3 // 10)),
        st.integers(0, 2),
    )


def engine_configs(max_len: int = 40, base: EngineConfig | None = None) -> st.SearchStrategy[EngineConfig]:
    """Engine configurations with pools of a few blocks fewer or more than one
    ``max_len``-token request needs (the longer requests cannot run in the smaller ones,
    and must be refused), and swap spaces of 0 to 64 blocks. Without ``base``, every scheduling
    knob is drawn too; with it, only the pool (unless ``base.num_blocks`` is set) and the
    swap space (:func:`pinned_config`)."""
    swap_kib = st.sampled_from([0, 4, 64])
    if base is not None:
        least = blocks_for(max_len, base.block_size)
        pools = st.just(base.num_blocks) if base.num_blocks else st.integers(least, least + 6)
        return st.builds(pinned_config, st.just(base), pools, swap_kib)
    return st.builds(
        engine_config,
        block_size=st.integers(1, 4),
        extra_blocks=st.integers(-4, 6),
        budget=st.integers(1, 20),
        max_num_seqs=st.integers(1, 6),
        swap_kib=st.none() | swap_kib,
        caching=st.booleans(),
        chunked=st.booleans(),
        watermark=st.sampled_from([0.0, 0.1]),
        patience=st.integers(0, 4),
        max_len=st.just(max_len),
    )


def pinned_config(base: EngineConfig, num_blocks: int, swap_kib: int) -> EngineConfig:
    """``base`` with a pool of ``num_blocks`` and ``swap_kib`` 1 KiB swap blocks (the
    stand-in executor's block size: a real byte budget would mean thousands of them)."""
    return EngineConfig(**{
        **base.model_dump(), "num_blocks": num_blocks, "kv_cache_memory_bytes": None, "gpu_memory_fraction": None,
        "swap_space_bytes": swap_kib * 1024,
    })


def engine_config(
    block_size: int, extra_blocks: int, budget: int, max_num_seqs: int, swap_kib: int | None, caching: bool,
    chunked: bool, watermark: float, patience: int, max_len: int,
) -> EngineConfig:
    """One configuration of :func:`engine_configs` (a reproduction names it so): a pool of
    ``extra_blocks`` more (or, negative, fewer) than a ``max_len``-token request needs; ``swap_kib`` ``None``
    preempts by recompute, otherwise by swap into that many 1 KiB blocks (the stand-in
    executor's block size); unchunked prefill gets a budget that holds a whole prompt."""
    return EngineConfig(
        block_size=block_size,
        num_blocks=blocks_for(max_len, block_size) + extra_blocks,
        max_num_batched_tokens=budget if chunked else max_len + budget,
        max_num_seqs=max_num_seqs,
        preemption_mode="recompute" if swap_kib is None else "swap",
        swap_space_bytes=(swap_kib or 0) * 1024,
        enable_prefix_caching=caching,
        enable_chunked_prefill=chunked,
        kv_watermark=watermark,
        head_of_line_patience=patience,
        priority_aging_s=5.0,
    )
