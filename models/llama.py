"""A Llama-architecture model (SmolLM2, Llama 2/3, ...): RoPE, RMSNorm, SwiGLU, grouped-query
attention, optionally tied embeddings.

Like :mod:`pagedkv.models.gpt` it runs on a flat batch of tokens with a pluggable attention backend;
the paged cache stores only the ``num_key_value_heads`` K/V heads, so GQA shrinks every page.
Q/K/V and gate/up are fused into one matmul each (as vLLM does): on a CPU, fewer and larger
matmuls run markedly faster at decode batch sizes. Weights are in the Hugging Face layout
(rotate-half RoPE); :mod:`pagedkv.models.gguf` undoes llama.cpp's Q/K row permutation on load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from pagedkv.models.attention import Attention, PagedAttention
from pagedkv.models.base import PagedLM
from pagedkv.models.cpu_kernel import CPUKernels, LlamaStep, all_cpu_contiguous, kernels_for
from pagedkv.models.layers import KERNEL_ROWS, Linear, RMSNorm
from pagedkv.paged.kv_cache import KVCache


class LlamaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(ge=2)
    hidden_size: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    num_hidden_layers: int = Field(ge=1)
    num_attention_heads: int = Field(ge=1)
    num_key_value_heads: int = Field(ge=1)
    max_position_embeddings: int = Field(ge=1)
    rms_norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @model_validator(mode="after")
    def _heads(self) -> LlamaConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once (in float64, stored in the model's dtype)."""

    cos: torch.Tensor  # buffers, registered below
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, positions: torch.Tensor) -> Rotation:
        """The rotation at these positions, for every layer of one forward."""
        return Rotation(self.cos, self.sin, positions)


class Rotation:
    """RoPE at one forward's positions. On the CPU the kernel rotates q and k in place in the
    fused QKV output, one pass (PyTorch takes eight ops and a copy of both); elsewhere the cos
    and sin rows are gathered once per forward and :func:`rotate` applies them."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> None:
        self.kernels = kernels_for(cos) if positions.dtype == torch.int64 else None
        self.positions = positions.contiguous()
        if self.kernels is not None:
            self.cos, self.sin = cos, sin  # the tables: the kernel looks positions up itself
        else:
            self.cos, self.sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # [T, 1, D / 2]

    def __call__(self, qkv: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k of the fused QKV output ``qkv`` ([T, heads + 2 kv_heads, D]), rotated."""
        if self.kernels is not None:
            self.kernels.rope_(qkv, heads + kv_heads, self.positions, self.cos, self.sin)
            return qkv[:, :heads], qkv[:, heads : heads + kv_heads]
        q, k = rotate(qkv[:, : heads + kv_heads], self.cos, self.sin).split([heads, kv_heads], dim=1)
        return q, k


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply RoPE (rotate-half form) to ``x`` ([T, heads, head_dim])."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        qkv = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, qkv, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: Rotation, attention: Attention, layer: int) -> torch.Tensor:
        qkv = self.qkv_proj(x).view(x.shape[0], -1, self.head_dim)  # [T, H + 2 Hkv, D]
        q, k = rope(qkv, self.num_heads, self.num_kv_heads)
        out = attention(layer, q, k, qkv[:, self.num_heads + self.num_kv_heads :])
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """One block. It takes and returns the residual stream apart from the block's last output,
    so that each residual add is fused into the norm that follows it (one pass, as vLLM does):
    ``x + attn(norm(x))`` then ``+ mlp(norm(...))``, with the adds done by the next norm."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, rope: Rotation,
        attention: Attention, layer: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: the previous block's MLP output (the embeddings, with ``residual`` None, for
        the first); returns this block's MLP output and the residual stream before it."""
        if residual is None:
            hidden, residual = self.input_layernorm(x), x
        else:
            hidden, residual = self.input_layernorm.add_and_norm(x, residual)
        hidden = self.self_attn(hidden, rope, attention, layer)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(hidden), residual


class Llama(PagedLM):
    """``fused_cpu_layers``: whether CPU steps the kernels take whole run each layer as one C
    call (:class:`FusedLayers`); those steps call no module of a layer, so its hooks and any
    forward a subclass or wrapper puts there do not run. Set it False to run every layer through
    its modules."""

    fused_cpu_layers: bool = True

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(
            vocab_size=config.vocab_size, max_model_len=config.max_position_embeddings,
            eos_token_id=config.eos_token_id, num_layers=config.num_hidden_layers,
            num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
        )
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rope(positions)
        fused = FusedLayers.of(self, x, rope, attention)
        if fused is not None:
            x, residual = fused.run()
        else:
            for layer, block in enumerate(self.layers):
                x, residual = block(x, residual, rope, attention, layer)
        return self.norm.add_and_norm(x, residual)[0] if residual is not None else self.norm(x)


class FusedLayers:
    """The decoder layers of one forward as one C call each (``csrc/llama_layer.c``), for the
    steps the CPU kernels take whole: decode-sized batches (at most :data:`KERNEL_ROWS` rows)
    over a paged cache, float32 or bfloat16 weights without biases. The same kernels run in the
    same order as through the modules, so the outputs are equal bit for bit; what goes is the
    Python between them, about 100 us a layer (docs/benchmarks.md). The MLP's activation stays
    PyTorch's ``silu(gate) * up``."""

    def __init__(self, kernels: CPUKernels, step: LlamaStep, buffers: dict[str, torch.Tensor]) -> None:
        self.kernels, self.step, self.buffers = kernels, step, buffers

    @staticmethod
    def of(model: Llama, x: torch.Tensor, rope: Rotation, attention: Attention) -> FusedLayers | None:
        """The fused layers for this forward of ``x`` (the embeddings), or None where the modules
        must run it."""
        kernels = kernels_for(x)
        if not model.fused_cpu_layers or kernels is None or rope.kernels is None or x.shape[0] > KERNEL_ROWS:
            return None
        if not isinstance(attention, PagedAttention) or attention.kernel is None:
            return None
        meta, cache, config = attention.meta, attention.cache, model.config
        indices = {"positions": rope.positions, "slots": meta.slot_mapping, "block_tables": meta.block_tables,
                   "query_starts": meta.query_starts_t, "query_lens": meta.query_lens_t,
                   "context_lens": meta.context_lens_t}
        table = _layer_pointers(model, cache, x.dtype)
        if table is None or not all_cpu_contiguous(torch.int64, *indices.values()):
            return None
        if not all_cpu_contiguous(x.dtype, x, rope.cos, rope.sin):
            return None
        heads, kv_heads, dim, tokens = config.num_attention_heads, config.num_key_value_heads, config.head_dim, len(x)
        widths = {"residual": config.hidden_size, "normed": config.hidden_size, "qkv": (heads + 2 * kv_heads) * dim,
                  "attn": heads * dim, "gate_up": 2 * config.intermediate_size}
        buffers = {"x": x, "table": table, **{name: x.new_empty(tokens, width) for name, width in widths.items()}}
        step = LlamaStep(
            bf16=int(x.dtype == torch.bfloat16), tokens=tokens, hidden=config.hidden_size, heads=heads,
            kv_heads=kv_heads, head_dim=dim, intermediate=config.intermediate_size, layers=len(model.layers),
            seqs=len(meta.query_starts_t), block_size=cache.block_size, num_blocks=cache.keys[0].shape[0],
            table_width=meta.block_tables.shape[1], max_positions=rope.cos.shape[0], cos=rope.cos.data_ptr(),
            sin=rope.sin.data_ptr(), layer_table=table.data_ptr(), eps=config.rms_norm_eps, scale=dim**-0.5,
            **{name: t.data_ptr() for name, t in indices.items()},
            **{name: buffers[name].data_ptr() for name in ("x", *widths)},
        )
        return FusedLayers(kernels, step, buffers)

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's MLP output and the residual stream before it, as the modules return them."""
        gate_up, act, layers = self.buffers["gate_up"], None, self.step.layers
        for layer in range(layers):
            self.kernels.llama_layer(self.step, layer, act)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up
        self.kernels.llama_layer(self.step, layers, act)
        return self.buffers["x"], self.buffers["residual"]


def _layer_pointers(model: Llama, cache: KVCache, dtype: torch.dtype) -> torch.Tensor | None:
    """Each layer's weights (packed where the linear kernel takes them) and caches, as
    ``csrc/llama_layer.c`` reads them: [layers, 8] addresses; None if any is not the kernels'."""
    table: list[int] = []
    for layer, block in enumerate(model.layers):
        if not isinstance(block, LlamaDecoderLayer):
            return None
        attn, mlp = block.self_attn, block.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        layer_norms = (block.input_layernorm, block.post_attention_layernorm)
        if not all(isinstance(m, Linear) for m in linears) or not all(isinstance(n, RMSNorm) for n in layer_norms):
            return None  # a module swapped for another kind (an adapter, say): the modules run it
        tiles = [linear.kernel_tiles() for linear in linears]
        norms = [n.weight for n in layer_norms]
        caches = [cache.keys[layer], cache.values[layer]]
        if any(t is None for t in tiles) or any(n is None for n in norms):
            return None
        qkv, o, gate_up, down = [t.data_ptr() for t in tiles if t is not None]
        if not all_cpu_contiguous(dtype, *norms, *caches):
            return None
        table += [norms[0].data_ptr(), qkv, o, norms[1].data_ptr(), gate_up, down, *(c.data_ptr() for c in caches)]
    return torch.tensor(table, dtype=torch.int64)
