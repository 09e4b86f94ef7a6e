"""How to size the engine: the K/V pool and the work one step may take."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from pagedkv.errors import InvalidRequestError
from pagedkv.scheduler.validation import InputModel, MemorySize


class EngineConfig(InputModel):
    """How big the K/V pool is and how much work one step may take.

    The pool size comes from exactly one of ``num_blocks``, ``kv_cache_memory_bytes`` or
    (CUDA) ``gpu_memory_fraction`` of the free GPU memory; with none given, 256 MiB.
    ``max_model_len`` defaults to the model's context length.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)

    block_size: int = Field(16, ge=1, le=1024)
    """Tokens per K/V page."""
    num_blocks: int | None = Field(None, ge=1)
    """Pages in the pool (instead of a memory budget)."""
    kv_cache_memory_bytes: MemorySize | None = Field(None, ge=1)
    """Memory for the K/V pool, e.g. 256MiB or 2GiB (default 256MiB when no size is given)."""
    gpu_memory_fraction: float | None = Field(None, gt=0.0, le=1.0)
    """CUDA only: size the pool from this fraction of the free GPU memory."""
    max_num_batched_tokens: int = Field(1024, ge=1)
    """Token budget of one step (prefill chunks plus decodes)."""
    max_num_seqs: int = Field(128, ge=1)
    """Sequences running at once."""
    max_model_len: int | None = Field(None, ge=1)
    """Longest prompt + output served (default: the model's context length)."""
    seed: int = Field(0, ge=0, lt=2**63)
    """Seed of the random model weights (tiny models) and of unseeded sampling."""
    enable_prefix_caching: bool = True
    """Share the K/V of full blocks between requests with the same prefix (paged.prefix)."""
    enable_chunked_prefill: bool = True
    """Prefill long prompts in chunks beside running decodes. Off: vLLM v0's policy, where
    a step either prefills whole prompts or decodes (needs a token budget >= max_model_len)."""
    preemption_mode: Literal["recompute", "swap"] = "recompute"
    """What a preempted sequence loses: its K/V (recomputed when it resumes) or nothing
    (its blocks are copied to the CPU swap space and back; recompute when that is full)."""
    swap_space_bytes: MemorySize = Field(256 * 2**20, ge=0)
    """CPU memory for swapped-out blocks (used only with ``preemption_mode="swap"``)."""
    kv_watermark: float = Field(0.01, ge=0.0, lt=1.0)
    """Fraction of the pool that admitting a request must leave free, so that admission
    does not at once force the running requests to preempt each other."""
    priority_aging_s: float = Field(10.0, gt=0.0)
    """Seconds of waiting that make up for one level of priority: requests are ranked by
    ``arrival_time + priority * priority_aging_s``, so no request starves."""
    head_of_line_patience: int = Field(32, ge=0)
    """Steps for which requests behind a waiting request that does not fit may be
    admitted before it; after that admission waits for it."""
    check_invariants: int = Field(0, ge=0)
    """Debug: run the KV manager's and the scheduler's invariant checks (docs/invariants.md)
    after every this many steps, and stop at the first violation (0: off). They cost
    O(pool + requests) each time."""

    @model_validator(mode="after")
    def _one_pool_size(self) -> EngineConfig:
        sizes = {"num_blocks": self.num_blocks, "kv_cache_memory_bytes": self.kv_cache_memory_bytes,
                 "gpu_memory_fraction": self.gpu_memory_fraction}
        given = [name for name, value in sizes.items() if value is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of num_blocks, kv_cache_memory_bytes, gpu_memory_fraction; got {given}")
        return self

    def resolve_max_model_len(self, model_max_len: int) -> int:
        """The context length to serve: the configured one, checked against the model's."""
        if self.max_model_len is not None and self.max_model_len > model_max_len:
            raise InvalidRequestError(
                f"max_model_len ({self.max_model_len}) exceeds the model's context length ({model_max_len})",
                "max_model_len",
            )
        return self.max_model_len or model_max_len

    @property
    def pool_memory_bytes(self) -> int | None:
        """The byte budget to size the pool from, when no block count is given."""
        if self.num_blocks is None and self.gpu_memory_fraction is None:
            return self.kv_cache_memory_bytes or 256 * 2**20
        return self.kv_cache_memory_bytes
