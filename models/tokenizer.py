"""Text in and out: a byte-level BPE tokenizer built from a GGUF file's own vocabulary and
merges with the ``tokenizers`` library, the file's chat template, and streaming decoding.

Streaming uses ``tokenizers``' ``DecodeStream``: a character whose UTF-8 bytes are split
across several tokens is held back until it is whole, so a stream never shows half an emoji.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from pagedkv.models.gguf import field

if TYPE_CHECKING:
    from gguf import GGUFReader

CONTROL = 3  # llama.cpp's token type for special tokens such as <|im_end|>
USER_DEFINED = 4  # added tokens matched whole in text, but not special


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """Split text the way llama.cpp does for this vocabulary before BPE runs."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):  # digits one by one, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in (None, "default", "gpt2", "gpt-2", "mpt", "olmo"):
        return byte_level
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")


class TextTokenizer:
    """Encode text to ids, decode ids to text, render chat messages, stream detokenization."""

    def __init__(self, tokenizer: Tokenizer, eos_token_id: int | None, bos_token_id: int | None,
                 add_bos: bool = False, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template

    @classmethod
    def from_gguf(cls, reader: GGUFReader) -> TextTokenizer:
        kind = field(reader, "tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"unsupported GGUF tokenizer {kind!r}; only byte-level BPE ('gpt2') is supported")
        tokens = field(reader, "tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        tok.pre_tokenizer = _pre_tokenizer(field(reader, "tokenizer.ggml.pre"))
        tok.decoder = decoders.ByteLevel()
        types = field(reader, "tokenizer.ggml.token_type") or []  # may be absent: then no added tokens
        kinds = list(zip(tokens, types, strict=False))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == USER_DEFINED])
        return cls(
            tok,
            eos_token_id=field(reader, "tokenizer.ggml.eos_token_id"),
            bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
            add_bos=bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
            chat_template=field(reader, "tokenizer.chat_template"),
        )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self) -> StreamDetokenizer:
        return StreamDetokenizer(self.tokenizer)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render ``[{"role": ..., "content": ...}, ...]`` with the model's own template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        template = env.from_string(self.chat_template)
        special = {
            name: self.tokenizer.id_to_token(i) if i is not None else ""
            for name, i in (("bos_token", self.bos_token_id), ("eos_token", self.eos_token_id))
        }
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **special)


class StreamDetokenizer:
    """Turns one request's tokens, fed one at a time, into text pieces that are whole characters."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._stream = decoders.DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tokenizer, token_id) or ""
