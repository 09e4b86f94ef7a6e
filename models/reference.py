"""Generation without the paged engine: the correctness reference and the baselines.

- :func:`generate_no_cache` recomputes the whole sequence for every new token. It shares
  nothing with the cache code paths, which is what makes it the reference for tests.
- :func:`generate_contiguous_cache` keeps one growing K/V tensor per layer, the classic
  ``past_key_values`` approach, as the "simple cache" baseline in benchmarks.

Both are greedy and run one sequence at a time.
"""

from __future__ import annotations

import torch

from pagedkv.models.attention import ContiguousCacheAttention, DenseAttention
from pagedkv.models.base import PagedLM


@torch.inference_mode()
def prefill_logits(model: PagedLM, token_ids: list[int]) -> torch.Tensor:
    """Logits at every position of ``token_ids`` ([T, V]), from one dense forward."""
    ids = torch.tensor(token_ids, device=model.device)
    positions = torch.arange(len(token_ids), device=model.device)
    return model(ids, positions, DenseAttention([len(token_ids)]))


@torch.inference_mode()
def generate_no_cache(model: PagedLM, prompt: list[int], max_new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        last = torch.tensor([len(tokens) - 1], device=model.device)
        ids = torch.tensor(tokens, device=model.device)
        positions = torch.arange(len(tokens), device=model.device)
        tokens.append(int(model(ids, positions, DenseAttention([len(tokens)]), last).argmax()))
    return tokens[len(prompt) :]


@torch.inference_mode()
def generate_contiguous_cache(model: PagedLM, prompt: list[int], max_new_tokens: int) -> list[int]:
    cache = ContiguousCacheAttention(model.kv_cache_spec().num_layers)
    new = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        start = len(prompt) + len(out) - len(new)
        ids = torch.tensor(new, device=model.device)
        positions = torch.arange(start, start + len(new), device=model.device)
        last = torch.tensor([len(new) - 1], device=model.device)
        out.append(int(model(ids, positions, cache, last).argmax()))
        new = out[-1:]
    return out
