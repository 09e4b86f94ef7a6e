"""Model configurations and named presets."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class GPTConfig(BaseModel):
    """A GPT-2-architecture model; field names follow transformers' ``GPT2Config``.

    ``init_std`` is the standard deviation of the random initialisation. GPT-2 uses 0.02;
    the tiny test preset uses more so that its greedy choices are not near-ties, which
    would make exact token comparisons between two correct float orders flaky.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(50257, ge=2)
    n_positions: int = Field(1024, ge=1)
    n_embd: int = Field(768, ge=1)
    n_layer: int = Field(12, ge=1)
    n_head: int = Field(12, ge=1)
    layer_norm_epsilon: float = Field(1e-5, gt=0)
    eos_token_id: int | None = 50256
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> GPTConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"eos_token_id ({self.eos_token_id}) must be in [0, vocab_size={self.vocab_size})")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


GPT_PRESETS: dict[str, GPTConfig] = {
    # Small enough that a test runs hundreds of engine steps in a second on a CPU.
    "tiny": GPTConfig(vocab_size=256, n_positions=512, n_embd=64, n_layer=2, n_head=4, eos_token_id=255, init_std=0.2),
    # GPT-2 small's shape (124M parameters), for benchmarks.
    "gpt2-small": GPTConfig(),
}
