"""Shared fixtures: the tiny model (built once), the real model, and engine factories.

Every engine made through ``make_engine`` or ``engine_with`` is checked after its test: no
request left, no block table left, every block free with ref count 0, pool invariants intact.
"""

from __future__ import annotations

import pytest
import torch

from pagedkv.models import GPT, ModelRunner
from pagedkv.scheduler import EngineConfig, LLMEngine
from tests.helpers import RecordingExecutor, assert_drained


@pytest.fixture(scope="session")
def tiny_model() -> GPT:
    return GPT.from_preset("tiny", seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (float32, CPU) and its tokenizer, loaded once per session."""
    from pagedkv.loader import load_model
    from pagedkv.models.gguf import smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_model("smollm2-135m", dtype=torch.float32, device="cpu")


@pytest.fixture
def make_engine(tiny_model):
    """Build engines on the tiny model (or another); each one is drain-checked at teardown."""
    engines: list[LLMEngine] = []

    def make(model=None, attention_backend="auto", **config) -> LLMEngine:
        engine = LLMEngine(ModelRunner(model or tiny_model, attention_backend), EngineConfig(**config))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert_drained(engine)


@pytest.fixture
def engine_with():
    """Engines on the recording executor, each drain-checked after its test."""
    engines = []

    def make(clock=None, **config) -> tuple[LLMEngine, RecordingExecutor]:
        executor = RecordingExecutor()
        engines.append(LLMEngine(executor, EngineConfig(**config), **({"clock": clock} if clock else {})))
        return engines[-1], executor

    yield make
    for engine in engines:
        assert_drained(engine)
