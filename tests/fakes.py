"""Stand-ins for the model: a soak run on :class:`pagedkv.testing.ContentExecutor` (which
checks the memory bookkeeping token by token; used by the tests and by
``benchmarks/soak.py``), and a runner that injects failures into a real one."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from pagedkv.scheduler import EngineConfig, LLMEngine, SamplingParams
from pagedkv.scheduler.request import FinishReason
from pagedkv.testing.executor import ContentExecutor


@dataclass
class SoakResult:
    steps: int = 0
    finished: dict[str, FinishReason] = field(default_factory=dict)
    aborted: set[str] = field(default_factory=set)
    submitted: list[str] = field(default_factory=list)
    max_seats: int = 0


def soak(
    num_requests: int, config: EngineConfig, seed: int = 0, abort_rate: float = 0.1
) -> tuple[LLMEngine, SoakResult]:
    """Feed ``num_requests`` random requests (prompts sharing prefixes, random lengths,
    priorities, n, arrival gaps) to an engine on a :class:`ContentExecutor`, abort some at
    random moments, and run until everything has ended."""
    rng = random.Random(seed)
    executor = ContentExecutor(seed=seed)
    engine = LLMEngine(executor, config)
    prefixes = [[rng.randrange(64) for _ in range(rng.randint(1, 20))] for _ in range(4)]
    result = SoakResult()
    pending = num_requests
    while pending or engine.has_unfinished_requests():
        for _ in range(min(pending, rng.choice([0, 0, 1, 1, 2, 3]))):
            rid = f"r{len(result.submitted)}"
            prompt = rng.choice(prefixes)[: rng.randint(0, 20)] + [rng.randrange(64) for _ in range(rng.randint(1, 12))]
            params = SamplingParams(
                temperature=1.0, max_tokens=rng.randint(1, 16), n=rng.choice([1, 1, 1, 2, 3]), ignore_eos=True,
                stop_token_ids=[rng.randrange(64)] if rng.random() < 0.3 else [],
            )
            engine.add_request(rid, prompt, params, priority=rng.choice([0, 0, 1, 2]))
            result.submitted.append(rid)
            pending -= 1
        if result.submitted and rng.random() < abort_rate:
            rid = rng.choice(result.submitted)
            if rid in engine.scheduler.requests:
                result.aborted.add(rid)
            engine.abort(rid)
        busy, empty = engine.has_unfinished_requests(), executor.empty_plans
        outputs = engine.step()
        if busy and executor.empty_plans > empty:
            raise AssertionError(f"step {result.steps} scheduled nothing while requests waited")
        for out in outputs:
            if out.finished:
                if out.request_id in result.finished:
                    raise AssertionError(f"{out.request_id} finished twice")
                reasons = {s.finish_reason for s in out.outputs if s.finish_reason is not None}
                result.finished[out.request_id] = FinishReason.ABORT if FinishReason.ABORT in reasons else reasons.pop()
        result.max_seats = max(result.max_seats, engine.scheduler.num_seats_taken)
        result.steps += 1
    return engine, result


class FailingRunner:
    """Wraps a ModelRunner: raises in the forward of chosen steps, or makes NaN the logits
    of a request (by id, or any request a predicate picks), through a hook on the model."""

    def __init__(self, runner, fail_steps=(), nan_request=None):
        self.runner, self.fail_steps, self.nan_request, self.steps = runner, set(fail_steps), nan_request, 0
        self.vocab_size, self.max_model_len = runner.vocab_size, runner.max_model_len
        self.eos_token_id = runner.eos_token_id
        self.initialize_cache = runner.initialize_cache

    def execute(self, plan):
        self.steps += 1
        if self.steps in self.fail_steps and not plan.is_empty:
            raise RuntimeError("injected failure")
        sampling = [s for s in plan.scheduled for _ in range(s.samples)]  # the logits rows, in order
        poisoned = self.nan_request if callable(self.nan_request) else lambda r: r.request_id == self.nan_request
        rows = [i for i, s in enumerate(sampling) if self.nan_request is not None and poisoned(s.request)]
        if not rows:
            return self.runner.execute(plan)
        model = self.runner.model
        handle = model.register_forward_hook(lambda m, args, out: out.index_fill(0, torch.tensor(rows), float("nan")))
        try:
            return self.runner.execute(plan)
        finally:
            handle.remove()
