"""A GPT-2-architecture model, readable top to bottom.

Learned positions, pre-LayerNorm blocks, a tanh-GELU MLP, tied input/output embeddings.
Parameter names and shapes are those of transformers' ``GPT2LMHeadModel`` (including
GPT-2's ``Conv1D`` layout, weights stored ``[in, out]``), so a GPT-2 state dict loads as is.

The model works on a *flat* batch: ``[T]`` token ids and positions from any mix of
sequences, prefill chunks and decodes alike. Every matmul runs on exactly the T real
tokens; only attention needs to know which token belongs to which sequence, and that is
the job of the attention backend passed in.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pagedkv.models.attention import Attention
from pagedkv.models.base import PagedLM
from pagedkv.models.config import GPT_PRESETS, GPTConfig


class Conv1D(nn.Module):
    """GPT-2's linear layer: ``y = x @ weight + bias`` with ``weight`` shaped ``[in, out]``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class SelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor, attention: Attention, layer: int) -> torch.Tensor:
        q, k, v = self.c_attn(x).view(x.shape[0], 3, self.n_head, -1).unbind(1)
        return self.c_proj(attention(layer, q, k, v).flatten(1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, 4 * config.n_embd)
        self.c_proj = Conv1D(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attention: Attention, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attention, layer)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """GPT-2's body (the ``transformer.*`` keys of its state dict): embeddings, blocks, final norm."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT(PagedLM):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__(
            vocab_size=config.vocab_size, max_model_len=config.n_positions, eos_token_id=config.eos_token_id,
            num_layers=config.n_layer, num_kv_heads=config.n_head, head_dim=config.head_dim,
        )
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)
        for layer, block in enumerate(t.h):
            x = block(x, attention, layer)
        return t.ln_f(x)

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_config(
        cls, config: GPTConfig, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> GPT:
        """A randomly initialised model, the same for the same seed on every machine."""
        model = cls(config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or ".ln_" in name:  # LayerNorms start as identity
                    p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * config.init_std)
        return model.to(device=device, dtype=dtype).eval()

    @classmethod
    def from_preset(
        cls, name: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> GPT:
        if name not in GPT_PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; choose from {sorted(GPT_PRESETS)}")
        return cls.from_config(GPT_PRESETS[name], seed, dtype, device)

    @classmethod
    def from_state_dict(
        cls,
        state_dict: dict[str, torch.Tensor],
        config: GPTConfig,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> GPT:
        """Load a GPT-2-format state dict (``GPT2LMHeadModel`` or bare ``GPT2Model`` keys).

        GPT-2's non-parameter buffers (``attn.bias``, ``attn.masked_bias``) are ignored;
        a missing ``lm_head.weight`` is fine because it is tied to ``wte``.
        """
        sd = {}
        for key, value in state_dict.items():
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if not key.startswith(("transformer.", "lm_head.")):
                key = "transformer." + key
            sd[key] = value
        if "lm_head.weight" not in sd and "transformer.wte.weight" in sd:
            sd["lm_head.weight"] = sd["transformer.wte.weight"]
        model = cls(config)
        model.load_state_dict(sd, strict=True)
        return model.to(device=device, dtype=dtype).eval()

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, config: GPTConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> GPT:
        """Load a ``.safetensors`` file or a ``torch.save``'d state dict."""
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        return cls.from_state_dict(state_dict, config, dtype, device)
