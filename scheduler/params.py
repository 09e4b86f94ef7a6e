"""The validated public inputs: how to sample a request, and how to size the engine.

Pydantic models at the boundary, strict about types (``True`` is not a token budget,
``"3"`` is not a top-k) and with messages that name the field and its allowed range.
Ranges follow vLLM's so that code written for it behaves the same here.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator


class SamplingParams(BaseModel):
    """How to pick each next token of one request, and when to stop.

    ``temperature == 0`` means greedy. ``top_k`` of -1 or 0 and ``top_p == 1`` switch
    those filters off. A request stops at the model's EOS (unless ``ignore_eos``), at any
    of ``stop_token_ids``, or after ``max_tokens`` new tokens.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    n: int = 1
    seed: int | None = None
    stop_token_ids: tuple[StrictInt, ...] = Field((), strict=False)  # a list is fine too
    ignore_eos: bool = False

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if not (math.isfinite(v) and 0.0 <= v <= 2.0):
            raise ValueError(f"temperature must be a finite number in [0, 2], got {v}")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float) -> float:
        if not (math.isfinite(v) and 0.0 < v <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {v}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or >= 1, got {v}")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"max_tokens must be >= 1, got {v}")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"n must be >= 1, got {v}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {v}")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(t < 0 for t in v):
            raise ValueError(f"stop_token_ids must be non-negative token ids, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _seeds_in_range(self) -> SamplingParams:
        if self.seed is not None and self.seed + self.n > 2**63:
            raise ValueError(f"seed + n - 1 must be < 2**63 (sequence i uses seed + i), got seed {self.seed} and n {self.n}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def for_sequence(self, index: int) -> SamplingParams:
        """The parameters of sequence ``index`` of an ``n > 1`` request: one sequence,
        seeded ``seed + index``."""
        seed = None if self.seed is None else self.seed + index
        return self.model_copy(update={"n": 1, "seed": seed})


class EngineConfig(BaseModel):
    """How big the K/V pool is and how much work one step may take.

    The pool size comes from exactly one of ``num_blocks``, ``kv_cache_memory_bytes`` or
    (CUDA) ``gpu_memory_fraction`` of the free GPU memory; with none given, 256 MiB.
    ``max_model_len`` defaults to the model's context length.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    block_size: int = Field(16, ge=1, le=1024)
    num_blocks: int | None = Field(None, ge=1)
    kv_cache_memory_bytes: int | None = Field(None, ge=1)
    gpu_memory_fraction: float | None = Field(None, gt=0.0, le=1.0)
    max_num_batched_tokens: int = Field(1024, ge=1)
    max_num_seqs: int = Field(128, ge=1)
    max_model_len: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0, lt=2**63)
    enable_prefix_caching: bool = True
    """Share the K/V of full blocks between requests with the same prefix (paged.prefix)."""
    enable_chunked_prefill: bool = True
    """Prefill long prompts in chunks beside running decodes. Off: vLLM v0's policy, where
    a step either prefills whole prompts or decodes (needs a token budget >= max_model_len)."""
    preemption_mode: Literal["recompute", "swap"] = "recompute"
    """What a preempted sequence loses: its K/V (recomputed when it resumes) or nothing
    (its blocks are copied to the CPU swap space and back; recompute when that is full)."""
    swap_space_bytes: int = Field(256 * 2**20, ge=0)
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

    @model_validator(mode="after")
    def _one_pool_size(self) -> EngineConfig:
        given = [n for n in ("num_blocks", "kv_cache_memory_bytes", "gpu_memory_fraction") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of num_blocks, kv_cache_memory_bytes, gpu_memory_fraction; got {given}")
        return self

    def resolve_max_model_len(self, model_max_len: int) -> int:
        """The context length to serve: the configured one, checked against the model's."""
        if self.max_model_len is not None and self.max_model_len > model_max_len:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's context length ({model_max_len})")
        return self.max_model_len or model_max_len

    @property
    def pool_memory_bytes(self) -> int | None:
        """The byte budget to size the pool from, when no block count is given."""
        if self.num_blocks is None and self.gpu_memory_fraction is None:
            return self.kv_cache_memory_bytes or 256 * 2**20
        return self.kv_cache_memory_bytes
