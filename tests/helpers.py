"""Helpers the tests share: the drain check, random prompts, a recording executor, a
scripted one and a tokenizer of fixed pieces.

Plain functions and classes, imported as ``from tests.helpers import ...``; the fixtures
built on them live in ``conftest.py``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from pagedkv.models.cpu_kernel import load_cpu_kernel
from pagedkv.scheduler import CacheLayout, EngineConfig, LLMEngine, SchedulerOutput, StepResult
from pagedkv.testing.executor import fake_layout

# Both attention paths of the CPU runner: the C kernel (skipped where no C compiler builds it)
# and the gather path, the reference it is checked against.
needs_cpu_kernel = pytest.mark.skipif(
    load_cpu_kernel() is None,
    reason="the CPU attention kernel does not build here (no C compiler)",
)
ATTENTION_BACKENDS = pytest.mark.parametrize("backend", [pytest.param("kernel", marks=needs_cpu_kernel), "gather"])


def assert_drained(engine: LLMEngine) -> None:
    """The engine holds nothing: no request, no block table, every block free."""
    scheduler, kv = engine.scheduler, engine.kv_manager
    assert not scheduler.requests, f"requests left: {list(scheduler.requests)}"
    assert not scheduler.waiting and not scheduler.running
    assert kv.num_tables() == 0
    assert kv.pool.num_free == kv.num_blocks
    assert all(kv.pool.ref_count(b) == 0 for b in range(kv.num_blocks))
    kv.check()


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

    def initialize_cache(self, config: EngineConfig) -> CacheLayout:
        """Its blocks count as 1 KiB each for the swap space."""
        return fake_layout(config)

    def execute(self, plan: SchedulerOutput) -> StepResult:
        self.plans.append(plan)
        return StepResult([(1,) * s.samples for s in plan.scheduled])


def drain(engine: LLMEngine, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return
        engine.step()
    raise AssertionError("engine did not finish")


class ScriptedExecutor(RecordingExecutor):
    """Samples chosen tokens: sequence ``i`` of every request gets ``scripts[i]`` in order
    (then ``filler``); a forking row gets the first token of each script."""

    def __init__(self, scripts: list[list[int]], filler: int = 0) -> None:
        super().__init__()
        self.scripts, self.filler = scripts, filler

    def _token(self, index: int, position: int) -> int:
        script = self.scripts[index] if index < len(self.scripts) else []
        return script[position] if position < len(script) else self.filler

    def execute(self, plan: SchedulerOutput) -> StepResult:
        self.plans.append(plan)
        rows = []
        for s in plan.scheduled:
            seq = s.request
            if s.samples > 1:
                rows.append(tuple(self._token(i, 0) for i in range(s.samples)))
            else:
                rows.append((self._token(seq.index, seq.num_output_tokens),) * s.samples)
        return StepResult(rows)


class PieceTokenizer:
    """Token ``t`` reads as ``pieces[t]`` (a fixed string, maybe empty or several characters),
    whatever came before it. Prompts are given as token ids."""

    chat_template: str | None = None

    def __init__(self, pieces: dict[int, str]) -> None:
        self.pieces = pieces

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError("give the prompt as token ids")

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        raise NotImplementedError

    def detokenizer(self) -> PieceTokenizer:
        return self

    def step(self, token_id: int) -> str:
        return self.pieces[token_id]


class CharTokenizer:
    """One token per character, every token reading "x", and a chat template of ``role:
    content`` lines: enough for text prompts, chat and stop strings on the tiny random model."""

    chat_template: str | None = "role: content lines"

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 200 + 1 for c in text]

    def detokenizer(self) -> CharTokenizer:
        return self

    def step(self, token_id: int) -> str:
        return "x"

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)
