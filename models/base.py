"""What every model offers the runner, whatever its architecture."""

from __future__ import annotations

import torch
from torch import nn

from pagedkv.models.attention import Attention
from pagedkv.paged.kv_cache import KVCacheSpec


class PagedLM(nn.Module):
    """A causal LM whose attention goes through a pluggable backend.

    Subclasses pass their shape to ``__init__``, define ``lm_head``, and implement
    :meth:`hidden_states` over a flat batch of tokens; :meth:`forward` turns the rows that
    need them into logits.
    """

    lm_head: nn.Module  # defined by each subclass

    def __init__(self, *, vocab_size: int, max_model_len: int, eos_token_id: int | None,
                 num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
        """The final-normed hidden state of every token of the flat batch, ``[T, hidden]``."""
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: Attention,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """float32 logits for a flat batch of tokens; only for rows ``logits_indices`` if given
        (the last token of each sequence that samples, sparing the vocabulary matmul)."""
        x = self.hidden_states(input_ids, positions, attention)
        if logits_indices is not None:
            x = x[logits_indices]
        return self.lm_head(x).float()
