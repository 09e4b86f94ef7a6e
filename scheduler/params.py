"""The validated public inputs: how to sample a request, and how to size the engine.

Pydantic models at the boundary, strict about types (``True`` is not a token budget,
``"3"`` is not a top-k) and with messages that name the field and its allowed range.
Ranges follow vLLM's so that code written for it behaves the same here.
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    StrictInt,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pagedkv.errors import InvalidRequestError

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


_SHORT = reprlib.Repr()
"""Shows the refused value in a message without echoing all of it: a million stop ids
must not come back as megabytes of error text."""
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = _SHORT.maxfrozenset = _SHORT.maxdict = 20
_SHORT.maxstring = _SHORT.maxother = 200
_SHORT.maxlong = 100


def invalid_request(error: ValidationError) -> InvalidRequestError:
    """pydantic's error as ours: one line per refused field (its name, pydantic's message,
    the value given, shortened), with ``param`` naming the first field."""
    problems = error.errors(include_url=False)
    lines = []
    for p in problems:
        where = ".".join(str(part) for part in p["loc"]) or error.title
        message = str(p["ctx"]["error"]) if p["type"] == "value_error" else p["msg"]
        got = f" (got {_SHORT.repr(p['input'])})" if p["type"] != "missing" and p["loc"] else ""
        lines.append(f"{where}: {message}{got}")
    first = problems[0]["loc"] if problems else ()
    return InvalidRequestError("; ".join(lines), str(first[0]) if first else None)


_BYTE_SIZE: TypeAdapter[ByteSize] = TypeAdapter(ByteSize)


def _size_from_text(value: object) -> object:
    """``"256MiB"``, ``"2GiB"``, ``"1.5GB"`` -> bytes (pydantic's ``ByteSize`` units); any
    other value goes on unchanged to the strict integer check."""
    return int(_BYTE_SIZE.validate_python(value)) if isinstance(value, str) else value


MemorySize = Annotated[int, BeforeValidator(_size_from_text)]
"""A number of bytes, given as an integer or as text with a unit."""


GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily (vLLM's ``_SAMPLING_EPS``)."""


class InputModel(BaseModel):
    """A validated public input (sampling parameters, engine and workload configs): a
    refused value raises :class:`pagedkv.InvalidRequestError` whose ``param`` names the
    field, with pydantic's ``ValidationError`` as its ``__cause__``, so that callers catch
    one error class at every boundary."""

    if not TYPE_CHECKING:  # type checkers keep the pydantic plugin's typed __init__

        def __init__(self, **data: Any) -> None:
            try:
                super().__init__(**data)
            except ValidationError as e:
                raise invalid_request(e) from e


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
