"""Shared fixtures: the tiny model (built once), an engine factory, and the drain check.

Every engine made through ``make_engine`` is checked after its test: no request left, no
block table left, every block free with ref count 0, pool invariants intact.
"""

from __future__ import annotations

import random

import pytest
import torch

from models import GPT, ModelRunner
from scheduler import EngineConfig, LLMEngine, SchedulerOutput


@pytest.fixture(scope="session")
def tiny_model() -> GPT:
    return GPT.from_preset("tiny", seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (float32, CPU) and its tokenizer, loaded once per session."""
    from models.gguf import smollm2_path
    from models.registry import load_model

    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return load_model("smollm2-135m", dtype=torch.float32, device="cpu")


def assert_drained(engine: LLMEngine) -> None:
    """The engine holds nothing: no request, no block table, every block free."""
    scheduler, kv = engine.scheduler, engine.kv_manager
    assert not scheduler.requests, f"requests left: {list(scheduler.requests)}"
    assert not scheduler.waiting and not scheduler.running
    assert kv.num_tables() == 0
    assert kv.pool.num_free == kv.num_blocks
    assert all(kv.pool.ref_count(b) == 0 for b in range(kv.num_blocks))
    kv.check()


@pytest.fixture
def make_engine(tiny_model):
    """Build engines on the tiny model (or another); each one is drain-checked at teardown."""
    engines: list[LLMEngine] = []

    def make(model=None, **config) -> LLMEngine:
        engine = LLMEngine(ModelRunner(model or tiny_model), EngineConfig(**config))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert_drained(engine)


def random_prompts(seed: int, n: int, vocab: int, min_len: int = 1, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


class RecordingExecutor:
    """Returns token 1 for every sequence that samples, and remembers every plan."""

    vocab_size = 100
    max_model_len = 1000
    eos_token_id = None

    def __init__(self) -> None:
        self.plans: list[SchedulerOutput] = []

    def initialize_cache(self, config: EngineConfig) -> int:
        """Its blocks count as 1 KiB each for the swap space."""
        self.num_swap_blocks = config.swap_space_bytes // 1024 if config.preemption_mode == "swap" else 0
        return config.num_blocks

    def execute(self, plan: SchedulerOutput) -> list[tuple[int, ...]]:
        self.plans.append(plan)
        return [(1,) * s.samples for s in plan.scheduled]


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


def drain(engine: LLMEngine, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return
        engine.step()
    raise AssertionError("engine did not finish")
