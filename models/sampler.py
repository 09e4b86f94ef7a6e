"""Turn a batch of logits into one token per request: greedy, temperature, top-k, top-p.

Sampling uses the exponential race: ``argmax(probs / E)`` with ``E ~ Exp(1)`` per vocab
entry picks token ``i`` with probability ``probs[i]``. Its noise is one tensor per row,
so a request with a seed draws from its own generator, and its tokens depend on the seed
and on nothing else in the batch (alone or batched, preempted or not).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import torch

from pagedkv.scheduler.logprobs import TokenLogprobs
from pagedkv.scheduler.sampling_params import SamplingParams


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device).manual_seed(seed)
        self._seeded: dict[Hashable, torch.Generator] = {}  # per sequence id

    def release(self, seq_ids: Iterable[Hashable]) -> None:
        for sid in seq_ids:
            self._seeded.pop(sid, None)

    def __call__(
        self, logits: torch.Tensor, seq_ids: Sequence[Hashable], params: Sequence[SamplingParams]
    ) -> list[int]:
        """One token per row of ``logits`` ([B, V]) for the sequence in the same row."""
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy.tolist()
        # Greedy rows (temperature below GREEDY_TEMPERATURE) divide by 1: they take the
        # argmax below, and a near-zero divisor would only fill their row with NaN.
        temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=logits.device)[:, None]
        # Shift so the best logit is 0 before dividing: a tiny temperature then sends the
        # others to -inf (greedy in the limit) instead of overflowing everything to NaN.
        logits = logits.float()
        logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
        logits = _top_k_top_p(logits, params)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, (sid, p) in enumerate(zip(seq_ids, params, strict=True)):
            if p.seed is not None:
                noise[row].exponential_(generator=self._seeded_generator(sid, p.seed))
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        return torch.where(is_greedy, greedy, sampled).tolist()

    def logprobs(
        self, logits: torch.Tensor, tokens: Sequence[int], params: Sequence[SamplingParams]
    ) -> list[TokenLogprobs | None]:
        """For each row of ``logits`` ([B, V]) whose parameters ask for ``logprobs``: the
        log-probability of its sampled token (``tokens``, one per row) and its
        ``params.logprobs`` most likely tokens with theirs, most likely first; None for the
        other rows, which cost nothing.

        These are log-probabilities of the model's raw distribution, ``log_softmax(logits)``
        in float32, before temperature, top-k and top-p: what vLLM returns. So a greedy
        token's logprob is that of the top-1, and a sampled token that top-k or top-p could
        not have drawn still has its (finite) raw logprob. One ``log_softmax`` over the rows
        that asked, one gather and one ``topk`` (as wide as the widest request) for all."""
        asked = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[TokenLogprobs | None] = [None] * len(params)
        if not asked:
            return out
        rows = torch.tensor(asked, device=logits.device)
        logprobs = logits.index_select(0, rows).float().log_softmax(dim=-1)
        chosen = torch.tensor([tokens[i] for i in asked], device=logits.device)
        sampled = logprobs.gather(-1, chosen[:, None]).squeeze(-1).tolist()
        widths = [params[i].logprobs or 0 for i in asked]
        width = min(max(widths), logprobs.shape[-1])
        top_values: list[list[float]] = []
        top_ids: list[list[int]] = []
        if width:
            top = logprobs.topk(width, dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        for j, i in enumerate(asked):
            k = widths[j]
            pairs = tuple(zip(top_ids[j][:k], top_values[j][:k], strict=True)) if width else ()
            out[i] = TokenLogprobs(sampled[j], pairs)
        return out

    def _seeded_generator(self, seq_id: Hashable, seed: int) -> torch.Generator:
        g = self._seeded.get(seq_id)
        if g is None:
            g = self._seeded[seq_id] = torch.Generator(self.device).manual_seed(seed)
        return g


def _top_k_top_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Mask to -inf every token outside each row's top-k and top-p nucleus."""
    vocab = logits.shape[-1]
    use_k = any(p.top_k > 0 for p in params)
    use_p = any(p.top_p < 1.0 for p in params)
    if not (use_k or use_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if use_k:
        k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=logits.device)
        drop |= torch.arange(vocab, device=logits.device)[None, :] >= k[:, None]
    if use_p:
        top_p = torch.tensor([p.top_p for p in params], device=logits.device)
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before >= top_p[:, None]  # the top token always survives: its mass_before is 0
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
