"""The log-probabilities of a generated token: a value the executor computes, a request
keeps and its outputs carry."""

from __future__ import annotations

from typing import NamedTuple


class TokenLogprobs(NamedTuple):
    """The log-probabilities of one generated token (``SamplingParams.logprobs``)."""

    logprob: float
    """The sampled token's log-probability."""
    top: tuple[tuple[int, float], ...]
    """The ``SamplingParams.logprobs`` most likely tokens as ``(token id, logprob)``, most
    likely first."""
