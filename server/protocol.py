"""The OpenAI request bodies the server takes: strict about types, refusing every field it
does not support (a 400 naming it) instead of ignoring it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pagedkv.errors import InvalidRequestError
from pagedkv.scheduler import SamplingParams
from pagedkv.scheduler.sampling_params import MAX_LOGPROBS


class OpenAIBody(BaseModel):
    """A request body part: strictly typed, and every field not declared is refused (a 400
    naming it, "not supported by this server") rather than ignored, so that a client never
    gets a 200 that silently dropped what it asked for (tools, a response format...).
    A field given as ``null`` asks for nothing, so an undeclared one that is null counts as
    absent: clients that serialize every option, set or not, still work."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in cls.model_fields}
        return data


class Generation(OpenAIBody):
    """The fields both endpoints share. Sampling fields left out (or null) take
    :class:`SamplingParams`' defaults; it also checks their ranges. OpenAI fields we cannot
    honour are declared only so that their neutral value (what clients often send
    explicitly) is accepted; any other value is refused by :meth:`unsupported`."""

    model: str
    stream: bool = False
    stop: str | list[str] | None = None  # OpenAI's stop strings: SamplingParams.stop
    priority: int = 0
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    user: str | None = None  # only an end-user id for the provider's abuse monitoring: accepted, ignored
    presence_penalty: float | None = None  # 0 (no penalty) only
    frequency_penalty: float | None = None  # 0 (no penalty) only
    logit_bias: dict[str, float] | None = None  # empty only

    def unsupported(self) -> tuple[str, str] | None:
        """The first field given a value this server cannot honour, as ``(param, message)``;
        None if every value can be honoured."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported by this server (only 0)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by this server"
        return None

    def requested_max_tokens(self) -> int | None:
        """The output budget the client asked for, if any."""
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        """``SamplingParams.logprobs``: how many top alternatives per token, None for no logprobs."""
        return None

    def sampling_params(self, default_max_tokens: int | None = None) -> SamplingParams:
        """The engine's parameters for this body; ``default_max_tokens`` is the budget when the
        client gave none (None: :class:`SamplingParams`' default)."""
        given = self.model_dump(include=set(SamplingParams.model_fields))
        given["max_tokens"] = self.requested_max_tokens()
        if given["max_tokens"] is None:
            given["max_tokens"] = default_max_tokens
        given["logprobs"] = self.requested_logprobs()
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})  # null: the default


class CompletionRequest(Generation):
    """``/v1/completions``: a text or token-id prompt; ``max_tokens`` defaults to 16 (OpenAI's default)."""

    prompt: str | list[int]
    best_of: int | None = Field(None, ge=1)  # 1 only: we do not sample extra candidates to rank them
    echo: bool | None = None  # false only
    suffix: str | None = None  # empty only: no insertion (fill-in-the-middle) prompts
    logprobs: int | None = None  # OpenAI's legacy logprobs: that many top alternatives per token (0..20)

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of > 1:
            return "best_of", "best_of > 1 is not supported by this server; use n"
        if self.echo:
            return "echo", "echo is not supported by this server"
        if self.suffix:
            return "suffix", "suffix (insertion prompts) is not supported by this server"
        return super().unsupported()

    def requested_logprobs(self) -> int | None:
        return self.logprobs  # SamplingParams checks the range (param logprobs)


class ChatContentPart(BaseModel):
    """One part of a message's ``content`` list. Only ``{"type": "text", "text": ...}`` can be
    rendered; other types (``image_url``, ``input_audio``, ``file``...) keep their own fields
    (hence ``extra="allow"``) so that :meth:`ChatMessage.text` can refuse them by name."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessage(OpenAIBody):
    """One message. ``developer`` is OpenAI's newer name for ``system`` (rendered as such, as
    chat templates know only ``system``); tool and function messages are refused."""

    role: Literal["developer", "system", "user", "assistant"]
    content: str | list[ChatContentPart]

    def text(self, index: int) -> str:
        """The content as one string: text parts joined by newlines (as vLLM does). Raises
        :class:`InvalidRequestError` naming ``messages`` for a part that is not text."""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for i, part in enumerate(self.content):
            if part.type != "text":
                raise InvalidRequestError(
                    f"messages[{index}].content[{i}]: content parts of type {part.type!r} are not supported "
                    "by this server; only {'type': 'text', 'text': ...}", "messages")
            if part.text is None:
                raise InvalidRequestError(f"messages[{index}].content[{i}]: a text part needs its 'text'", "messages")
            texts.append(part.text)
        return "\n".join(texts)

    def for_template(self, index: int) -> dict[str, str]:
        """The message as a chat template takes it: ``{"role", "content"}``, both strings."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text(index)}


class ChatCompletionRequest(Generation):
    """``/v1/chat/completions``. Without ``max_tokens`` or ``max_completion_tokens`` the
    reply may use what is left of the context (see ``serve``), as OpenAI-compatible servers do.
    Tools, function calling and response formats are not declared, so they are refused."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # what current OpenAI clients send
    logprobs: bool | None = None  # true: each token's logprob, and top_logprobs alternatives
    top_logprobs: int | None = None  # 0..MAX_LOGPROBS, with logprobs true only

    def unsupported(self) -> tuple[str, str] | None:
        if (self.max_completion_tokens is not None and self.max_tokens is not None
                and self.max_completion_tokens != self.max_tokens):
            return "max_completion_tokens", (
                f"max_completion_tokens ({self.max_completion_tokens}) and max_tokens ({self.max_tokens}) "
                "disagree; give one of them")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            return "top_logprobs", f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.top_logprobs}"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs set to true"
        return super().unsupported()

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens
