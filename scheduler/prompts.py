"""Prompts as the engine takes them: the tokenizer it needs for text, and a prompt (text or
token ids) checked into a list of token ids before any state is touched."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pagedkv.errors import InvalidRequestError
from pagedkv.scheduler.text_stream import Detokenizer


class Tokenizer(Protocol):
    """What the engine needs to take text prompts and stream text back, and what its users
    (``LLM.chat``, the server, the CLI) need to turn a conversation into a prompt."""

    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...

    def detokenizer(self) -> Detokenizer: ...

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str: ...


def prompt_token_ids(prompt: str | Sequence[int], tokenizer: Tokenizer | None, vocab_size: int) -> list[int]:
    """The prompt's token ids: from text (with ``tokenizer``) or from a list/tuple (or array)
    of ints, each in ``[0, vocab_size)``; bools and bytes are refused. Every refusal is an
    :class:`~pagedkv.errors.InvalidRequestError` on ``prompt``."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidRequestError("this engine has no tokenizer; give the prompt as token ids", "prompt")
        _check_utf8(prompt)
        prompt = tokenizer.encode(prompt)
    elif hasattr(prompt, "tolist"):  # numpy arrays and tensors
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple, range)) or not all(type(t) is int for t in prompt):
        raise InvalidRequestError(
            f"prompt_token_ids must be a list of integer token ids (or a text prompt), got {type(prompt).__name__}"
            + (" containing non-integers" if isinstance(prompt, (list, tuple)) else ""),
            "prompt",
        )
    prompt = list(prompt)
    if not prompt:
        raise InvalidRequestError("prompt_token_ids is empty; a request needs at least one token", "prompt")
    lo, hi = min(prompt), max(prompt)
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise InvalidRequestError(f"prompt_token_ids: {bad} is outside the vocabulary [0, {vocab_size})", "prompt")
    return prompt


def _check_utf8(text: str) -> None:
    """Refuse text that has no UTF-8 form: a lone surrogate (``"\\ud800"``, which JSON's
    ``\\ud800`` escape and Python strings can carry) makes the tokenizer raise a TypeError
    that says nothing about the prompt."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"prompt is not valid Unicode: {text[e.start:e.end]!r} at index {e.start} is a lone surrogate", "prompt"
        ) from None
