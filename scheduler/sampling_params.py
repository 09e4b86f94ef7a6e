"""How to sample one request, and when to stop: the validated public input.

Pydantic models at the boundary, strict about types (``True`` is not a token budget,
``"3"`` is not a top-k) and with messages that name the field and its allowed range.
Ranges follow vLLM's so that code written for it behaves the same here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from pagedkv.scheduler.validation import InputModel

MAX_STOP_TOKEN_IDS = 1024
"""The most ``stop_token_ids`` one request may give: a bound on what one request costs to
validate and to hold (the per-token check itself is a set lookup, see ``Request.stop_ids``)."""

MAX_LOGPROBS = 20
"""The most top alternatives ``logprobs`` may ask for per token (vLLM's and OpenAI's limit)."""

MAX_STOP_STRINGS = 16
"""The most ``stop`` strings one request may give."""
MAX_STOP_STRING_LENGTH = 256
"""The longest ``stop`` string, in characters: the engine searches only each step's new
text and the last ``MAX_STOP_STRING_LENGTH - 1`` characters before it."""


def _stop_strings_as_tuple(value: object) -> object:
    """``stop`` as given: one string (a sequence of one), or a list or tuple of them; any
    other value goes on unchanged to the type check."""
    return (value,) if isinstance(value, str) else value


StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_LENGTH)]


GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily (vLLM's ``_SAMPLING_EPS``)."""


class SamplingParams(InputModel):
    """How to pick each next token of one request, and when to stop.

    ``temperature`` below ``GREEDY_TEMPERATURE`` (0 included) means greedy. ``top_k`` of
    -1 or 0 and ``top_p == 1`` switch those filters off. A request stops at the model's
    EOS (unless ``ignore_eos``), at any of ``stop_token_ids``, or after ``max_tokens`` new
    tokens, or when its generated text contains any of the ``stop`` strings.

    Out-of-range or wrongly typed values raise :class:`pagedkv.InvalidRequestError` whose
    ``param`` names the field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1)
    max_tokens: int = Field(16, ge=1)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop_token_ids: Annotated[
        Sequence[Annotated[StrictInt, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS), AfterValidator(tuple)
    ] = ()
    """A list or a tuple (at most ``MAX_STOP_TOKEN_IDS``); kept as a tuple, so that the
    parameters stay hashable."""
    stop: Annotated[
        Sequence[StopString],
        BeforeValidator(_stop_strings_as_tuple),
        Field(max_length=MAX_STOP_STRINGS),
        AfterValidator(tuple),
    ] = ()
    """Stop strings (vLLM's and OpenAI's ``stop``): one string or a list of them (at most
    ``MAX_STOP_STRINGS``, each 1 to ``MAX_STOP_STRING_LENGTH`` characters), kept as a tuple.
    A sequence ends (``finish_reason`` stop) as soon as its generated text contains one of
    them, and its text ends right before the first occurrence: the stop string itself is
    not returned. Its ``output_token_ids`` keep every token generated, the one that
    completed the stop string included (as vLLM does). While streaming, text that could
    still be the start of a stop string is held back from ``new_text`` until it cannot
    match (or the sequence ends for another reason). Needs an engine with a tokenizer."""
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """Token log-probabilities (vLLM's ``logprobs``): None computes none; N (0 to
    ``MAX_LOGPROBS``) returns, for every generated token, its log-probability and the N most
    likely tokens with theirs (``SequenceOutput.logprobs``). They are those of the model's
    raw distribution, before temperature, top-k and top-p (as vLLM returns them)."""

    @field_validator("seed")
    @classmethod
    def _seeds_in_range(cls, seed: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)  # absent when n itself was refused
        if seed is not None and seed + n > 2**63:
            raise ValueError(f"seed + n - 1 must be < 2**63 (sequence i uses seed + i), got n {n}")
        return seed

    @property
    def greedy(self) -> bool:
        """Whether to take the argmax. A temperature this close to 0 is greedy in the limit,
        and dividing by it would not be: 1e-300 is 0 in float32, and logits / 0 is NaN."""
        return self.temperature < GREEDY_TEMPERATURE

    def for_sequence(self, index: int) -> SamplingParams:
        """The parameters of sequence ``index`` of an ``n > 1`` request: one sequence,
        seeded ``seed + index``."""
        seed = None if self.seed is None else self.seed + index
        return self.model_copy(update={"n": 1, "seed": seed})
