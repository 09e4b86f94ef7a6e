"""A stand-in executor that checks the memory bookkeeping token by token.

:class:`ContentExecutor` keeps, for every device and swap block, which token each slot
holds. Each step it performs the plan's swap-outs, swap-ins and copies, writes every
scheduled token into its slot, and then checks that every scheduled sequence reads its own
tokens back from its whole context. Any mistake in swapping, copy-on-write, prefix
caching, preemption or block tables shows up as a wrong token in some slot. It samples
random tokens and needs no torch.
"""

from __future__ import annotations

import random

from pagedkv.scheduler import CacheLayout, EngineConfig, SchedulerOutput, StepResult


def fake_layout(config: EngineConfig) -> CacheLayout:
    """The cache of a stand-in executor: ``config.num_blocks`` blocks, counting 1 KiB each
    for the swap space."""
    if config.num_blocks is None:
        raise ValueError("num_blocks: a stand-in executor needs EngineConfig.num_blocks (no memory to size from)")
    return CacheLayout(config.num_blocks, config.swap_space_bytes // 1024 if config.preemption_mode == "swap" else 0)


class WrongContext(BaseException):
    """A bookkeeping bug. A BaseException, so that the engine's handling of failed steps
    (which catches Exception) does not turn it into a failed request."""


class ContentExecutor:
    vocab_size = 64
    eos_token_id = None

    def __init__(self, max_model_len: int = 64, seed: int = 0) -> None:
        self.max_model_len = max_model_len
        self.rng = random.Random(seed)
        self.block_size = 0
        self.device: dict[int, list[int | None]] = {}
        self.host: dict[int, list[int | None]] = {}
        self.num_checked_tokens = 0
        self.plans = 0
        self.empty_plans = 0
        self.max_batched_tokens = 0
        self.max_scheduled = 0

    def initialize_cache(self, config: EngineConfig) -> CacheLayout:
        """Blocks count as 1 KiB each for the swap space."""
        self.block_size = config.block_size
        return fake_layout(config)

    def _block(self, b: int) -> list[int | None]:
        return self.device.setdefault(b, [None] * self.block_size)

    def execute(self, plan: SchedulerOutput) -> StepResult:
        self.plans += 1
        self.empty_plans += plan.is_empty
        self.max_batched_tokens = max(self.max_batched_tokens, plan.num_batched_tokens)
        self.max_scheduled = max(self.max_scheduled, len(plan.scheduled))
        for d, c in plan.swap_out:
            self.host[c] = list(self._block(d))
        for c, d in plan.swap_in:
            self.device[d] = list(self.host[c])
        for src, dst in plan.block_copies:
            self.device[dst] = list(self._block(src))
        bs = self.block_size
        for s in plan.scheduled:  # every write of the step first, as each layer of a model does
            for i in range(s.start, s.start + s.num_new_tokens):
                self._block(s.block_ids[i // bs])[i % bs] = s.request.token_ids[i]
        for s in plan.scheduled:
            context = [self._block(s.block_ids[i // bs])[i % bs] for i in range(s.start + s.num_new_tokens)]
            if context != s.request.token_ids[: s.start + s.num_new_tokens]:
                raise WrongContext(
                    f"sequence {s.request.seq_id!r} reads {context}, not its tokens {s.request.token_ids}"
                )
            self.num_checked_tokens += len(context)
        rng = self.rng
        return StepResult([tuple(rng.randrange(self.vocab_size) for _ in range(s.samples)) for s in plan.scheduled])
