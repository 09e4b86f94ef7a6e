"""Attention backends. A model layer hands its new q, k, v (one row per token of a flat
batch) to a backend, which decides where keys and values come from:

- :class:`PagedAttention` writes the new K/V into their cache slots, then reads each
  sequence's context through its block table (in place with the CPU kernel, or gathered);
- :class:`DenseAttention` attends over the given tokens only (full recompute, the
  reference);
- :class:`ContiguousCacheAttention` keeps one growing tensor per layer for a single
  sequence (the classic ``past_key_values`` cache, a benchmark baseline).

Every backend is a callable ``(layer, q [T,H,D], k [T,Hkv,D], v [T,Hkv,D]) -> [T,H,D]``;
its metadata travels in the object, never in module-level state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from pagedkv.models.cpu_kernel import CPUKernels
from pagedkv.paged.kv_cache import KVCache


class Attention(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention on ``[..., T, H, D]`` queries and ``[..., S, Hkv, D]``
    keys/values (grouped-query when ``Hkv < H``). ``mask`` ([..., T, S], boolean) is True
    where a query may look; ``None`` means causal with queries aligned to the last keys."""
    if mask is None and q.shape[-3] != k.shape[-3]:
        mask = causal_mask(q.shape[-3], k.shape[-3], q.device)
    if q.device.type == "cpu" and q.dtype != torch.float32 and mask is not None:
        return _grouped_matmul_attention(q, k, v, mask)
    q, k, v = q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2)
    gqa = k.shape[-3] != q.shape[-3]
    if mask is not None:
        mask = mask.unsqueeze(-3)  # one mask for every head
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
    return out.transpose(-3, -2)


def _grouped_matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same attention as two batched matmuls, softmax in float32.

    On the CPU, PyTorch's fused kernel with a mask is 3-4x slower in bfloat16 than this
    (measured at decode shapes); in float32 the fused kernel wins, so only reduced
    precision comes here. The G query heads that share a K/V head are folded into the
    query rows, so each K/V head is read by one matmul and never repeated or broadcast.
    """
    heads, kv_heads, dim = q.shape[-2], k.shape[-2], q.shape[-1]
    tokens, group = q.shape[-3], heads // kv_heads
    qg = q.unflatten(-2, (kv_heads, group)).movedim(-4, -2).flatten(-3, -2)  # [..., Hkv, G*T, D]
    scores = torch.matmul(qg, k.movedim(-3, -1)).float() * dim**-0.5  # [..., Hkv, G*T, S]
    scores = scores.unflatten(-2, (group, tokens))
    scores.masked_fill_(~mask.unsqueeze(-3).unsqueeze(-3), float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype).flatten(-3, -2)
    out = torch.matmul(probs, v.movedim(-3, -2))  # [..., Hkv, G*T, D]
    return out.unflatten(-2, (group, tokens)).movedim(-2, -4).flatten(-3, -2)


def causal_mask(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
    """Query i (the ``num_keys - num_queries + i``-th token) sees keys up to its own position."""
    offset = num_keys - num_queries
    return torch.arange(num_keys, device=device)[None, :] <= torch.arange(offset, num_keys, device=device)[:, None]


def gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """The blocks ``tables`` ([..., n]) names, as ``[..., n * block_size, Hkv, D]`` tokens.

    ``index_select`` on the flat cache, not ``cache[tables]``: on CPU advanced indexing is
    an order of magnitude slower for this copy.
    """
    blocks = cache.index_select(0, tables.flatten())
    return blocks.view(*tables.shape[:-1], -1, *cache.shape[2:])


@dataclass(frozen=True)
class DecodeBatch:
    """The sequences of a step with exactly one new token (decodes, mostly), which the gather
    path attends together in one padded gather."""

    tokens: torch.Tensor  # [Bs] each one's token index in the flat batch
    context: torch.Tensor  # [Bs] its context length once this step's token is written
    tables: torch.Tensor  # [Bs, max_blocks] its block table, cut to the longest context's blocks


@dataclass(frozen=True)
class PagedMetadata:
    """Where a flat batch's tokens go in the cache and which context each sequence sees.

    The kernel takes every sequence at once (``query_starts_t``, ``query_lens_t``,
    ``context_lens_t``). The gather path attends the sequences with one new token together
    (:class:`DecodeBatch`) and those with several (prefill chunks) one at a time, so a long
    prompt never pads the decodes.
    """

    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    block_tables: torch.Tensor  # [B, max_blocks] physical block ids, zero-padded
    context_lens: list[int]  # tokens in the cache per sequence once this step's are written
    query_starts: list[int]  # B + 1 offsets of each sequence's new tokens in the flat batch
    query_starts_t: torch.Tensor  # [B] the same offsets (without the last), int64
    query_lens_t: torch.Tensor  # [B] new tokens per sequence
    context_lens_t: torch.Tensor  # [B] context_lens as a tensor
    decodes: DecodeBatch | None
    multi_rows: list[int]  # sequences with several new tokens


class PagedAttention:
    """Writes the new K/V into their slots, then attends each sequence over its context.

    With ``kernel`` (the CPU kernels, :mod:`pagedkv.models.cpu_kernel`) every sequence, decode
    or prefill chunk, reads the cache in place in one call; without it (other devices, other
    dtypes, no compiler) decodes go through :func:`gather` and chunks through PyTorch's SDPA,
    the reference the kernel is tested against.
    """

    def __init__(self, cache: KVCache, meta: PagedMetadata, kernel: CPUKernels | None = None) -> None:
        self.cache = cache
        self.meta = meta
        self.kernel = kernel

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta, bs = self.meta, self.cache.block_size
        k_cache, v_cache = self.cache.keys[layer], self.cache.values[layer]
        heads, dim = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, heads, dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, heads, dim).index_copy_(0, meta.slot_mapping, v)
        out = q.new_empty(q.shape)
        if self.kernel is not None:
            self.kernel.paged_attention(q, k_cache, v_cache, out, meta.block_tables, meta.query_starts_t,
                                        meta.query_lens_t, meta.context_lens_t)
            return out

        decodes = meta.decodes
        if decodes is not None:
            keys, values = gather(k_cache, decodes.tables), gather(v_cache, decodes.tables)  # [Bs, S, Hkv, D]
            visible = torch.arange(keys.shape[1], device=q.device) < decodes.context[:, None]
            qs = q[decodes.tokens].unsqueeze(1)  # [Bs, 1, H, D]
            out[decodes.tokens] = attend(qs, keys, values, visible[:, None, :]).squeeze(1)

        for row in meta.multi_rows:
            start, end = meta.query_starts[row], meta.query_starts[row + 1]
            context = meta.context_lens[row]
            if context == end - start:  # nothing cached before this chunk: use the fresh K/V
                keys, values = k[start:end], v[start:end]
            else:
                tables = meta.block_tables[row, : -(-context // bs)]
                keys, values = gather(k_cache, tables)[:context], gather(v_cache, tables)[:context]
            out[start:end] = attend(q[start:end], keys, values)
        return out


class DenseAttention:
    """Causal attention within each of several whole sequences laid end to end; no cache."""

    def __init__(self, seq_lens: list[int]) -> None:
        self.seq_lens = seq_lens

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([attend(*parts) for parts in zip(*(t.split(self.seq_lens) for t in (q, k, v)), strict=True)])


class ContiguousCacheAttention:
    """One sequence's K/V in a tensor per layer, grown by concatenation every step."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cached_k, cached_v = self.keys[layer], self.values[layer]
        if cached_k is not None and cached_v is not None:
            k = torch.cat([cached_k, k])
            v = torch.cat([cached_v, v])
        self.keys[layer], self.values[layer] = k, v
        return attend(q, k, v)
