"""What every model offers the runner, whatever its architecture."""

from __future__ import annotations

import torch
from torch import nn

from models.attention import Attention
from paged.kv_cache import KVCacheSpec


class PagedLM(nn.Module):
    """A causal LM whose attention goes through a pluggable backend.

    Subclasses set the plain attributes below in ``__init__`` and implement ``forward``
    over a flat batch: ``(input_ids [T], positions [T], attention, logits_indices) -> logits``.
    """

    vocab_size: int
    max_model_len: int
    eos_token_id: int | None
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: Attention,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError
