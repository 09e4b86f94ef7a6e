"""The model runner: a scheduler plan in, one sampled token per finished chunk out.

It is the engine's executor for a real model. Step inputs (token ids, positions, slot
mapping, block tables) are built as tensors with a handful of vectorised ops; the only
Python loops run once per *sequence*, never once per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Literal, get_args

import torch

from pagedkv.errors import InvalidRequestError
from pagedkv.models.attention import DecodeBatch, PagedAttention, PagedMetadata
from pagedkv.models.base import PagedLM
from pagedkv.models.cpu_kernel import CPUKernels, load_cpu_kernel
from pagedkv.models.host_memory import keep_freed_memory
from pagedkv.models.sampler import Sampler
from pagedkv.models.threads import shared_governor
from pagedkv.paged.kv_cache import KVCache, resolve_num_blocks
from pagedkv.scheduler.config import EngineConfig
from pagedkv.scheduler.executor import CacheLayout, SampledTokens, StepResult
from pagedkv.scheduler.plan import ScheduledRequest, SchedulerOutput
from pagedkv.scheduler.request import Request
from pagedkv.scheduler.sampling_params import SamplingParams


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attention: PagedMetadata
    logits_indices: torch.Tensor  # [S] flat index of the last token of each sampling sequence, once per sample


def prepare_inputs(
    plan: SchedulerOutput, block_size: int, device: torch.device, decode_batch: bool = True
) -> StepInputs:
    """Flatten a plan into the tensors one forward pass needs. ``decode_batch``: also build the
    gather path's :class:`DecodeBatch` (the CPU kernel does without it)."""
    scheduled = plan.scheduled
    q_lens = [s.num_new_tokens for s in scheduled]
    input_ids = list(chain.from_iterable(s.request.token_ids[s.start : s.start + s.num_new_tokens] for s in scheduled))
    max_blocks = max(len(s.block_ids) for s in scheduled)
    tables = torch.tensor([s.block_ids + (0,) * (max_blocks - len(s.block_ids)) for s in scheduled])

    lens = torch.tensor(q_lens)
    starts = torch.tensor([s.start for s in scheduled])
    offsets = torch.cumsum(lens, 0) - lens  # where each sequence's new tokens begin in the batch
    seq_of = torch.repeat_interleave(torch.arange(len(scheduled)), lens)
    positions = torch.arange(len(input_ids)) - offsets[seq_of] + starts[seq_of]
    slots = tables[seq_of, positions // block_size] * block_size + positions % block_size
    context = starts + lens
    single = torch.nonzero(lens == 1).flatten()
    samples = torch.tensor([s.samples for s in scheduled])

    def dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True)

    return StepInputs(
        input_ids=dev(torch.tensor(input_ids)),
        positions=dev(positions),
        attention=PagedMetadata(
            slot_mapping=dev(slots),
            block_tables=dev(tables),
            context_lens=context.tolist(),
            query_starts=[0, *torch.cumsum(lens, 0).tolist()],
            query_starts_t=dev(offsets),
            query_lens_t=dev(lens),
            context_lens_t=dev(context),
            decodes=DecodeBatch(
                tokens=dev(offsets[single]),
                context=dev(context[single]),
                tables=dev(tables[single, : -(-int(context[single].max()) // block_size)].contiguous()),
            ) if decode_batch and len(single) else None,
            multi_rows=[i for i, n in enumerate(q_lens) if n > 1],
        ),
        logits_indices=dev((offsets + lens - 1).repeat_interleave(samples)),
    )


AttentionBackend = Literal["auto", "kernel", "gather"]


def _attention_kernel(model: PagedLM, backend: AttentionBackend) -> CPUKernels | None:
    """The paged-attention kernel a runner uses: ``"gather"`` is the reference path (none),
    ``"kernel"`` insists on the CPU kernel, ``"auto"`` takes it where it applies (a CPU
    model in float32 or bfloat16, a C compiler present)."""
    if backend not in get_args(AttentionBackend):
        raise InvalidRequestError(
            f"attention_backend: {backend!r} is not one of {', '.join(get_args(AttentionBackend))}", "attention_backend"
        )
    if backend == "gather":
        return None
    applies = model.device.type == "cpu"
    kernel = load_cpu_kernel() if applies else None
    if kernel is not None and kernel.supports(model.dtype):
        return kernel
    if backend == "kernel":
        raise InvalidRequestError(
            f"attention_backend: the CPU kernel does not run a {model.dtype} model on {model.device} "
            "(it needs a CPU model in float32 or bfloat16 and a C compiler); use 'auto' or 'gather'",
            "attention_backend",
        )
    return None


class ModelRunner:
    """Runs a model (``models.GPT``, ``models.Llama`` or any other :class:`PagedLM`) for the engine."""

    def __init__(
        self, model: PagedLM, attention_backend: AttentionBackend = "auto", adapt_threads: bool = True
    ) -> None:
        """``adapt_threads`` (CPU only): lower PyTorch's thread count while other processes
        keep cores busy, and raise it back when they stop (:mod:`pagedkv.models.threads`)."""
        self.model = model
        self.attention_kernel = _attention_kernel(model, attention_backend)
        self.thread_governor = shared_governor() if adapt_threads and model.device.type == "cpu" else None
        self.vocab_size: int = model.vocab_size
        self.max_model_len: int = model.max_model_len
        self.eos_token_id: int | None = model.eos_token_id
        self.device: torch.device = model.device
        if self.device.type == "cpu":
            keep_freed_memory()  # activations are reused from step to step, not faulted in anew
        # What changes the K/V a token gets, folded into the prefix cache's keys.
        self.cache_salt = f"{type(model).__name__}/{next(model.parameters()).dtype}".encode()
        self.kv_cache: KVCache | None = None
        self.sampler: Sampler | None = None

    def initialize_cache(self, config: EngineConfig) -> CacheLayout:
        if self.kv_cache is not None:
            raise RuntimeError("this ModelRunner already serves an engine; give each engine its own runner")
        spec = self.model.kv_cache_spec()
        num_blocks = resolve_num_blocks(
            spec,
            config.block_size,
            self.device,
            num_blocks=config.num_blocks,
            memory_bytes=config.pool_memory_bytes,
            gpu_memory_fraction=config.gpu_memory_fraction,
        )
        block_bytes = spec.bytes_per_block(config.block_size)
        num_swap_blocks = config.swap_space_bytes // block_bytes if config.preemption_mode == "swap" else 0
        self.kv_cache = KVCache(spec, num_blocks, config.block_size, self.device, num_swap_blocks)
        self.sampler = Sampler(self.device, config.seed)
        self._warm_up(self.kv_cache, config.max_num_batched_tokens)
        return CacheLayout(num_blocks, num_swap_blocks, self.cache_salt, block_bytes)

    def _warm_up(self, kv_cache: KVCache, budget: int) -> None:
        """One step of a prompt as long as a step's token budget, then one decode, before any
        request: the one-time costs (weights packed for the CPU kernel and for oneDNN, oneDNN's
        kernels generated, the largest activations first touched) land at start-up, as vLLM's
        start-up profile run does, not in the first requests (which measured 10-45% slower in
        bench_vllm_cpu.py without it). It writes K/V only into blocks no request holds yet."""
        tokens = min(budget, self.max_model_len - 1, kv_cache.num_blocks * kv_cache.block_size - 1)
        if tokens < 1:
            return
        request = Request("warm-up", [0] * tokens, SamplingParams(temperature=0.0, max_tokens=1), 0.0)
        blocks = tuple(range(-(-(tokens + 1) // kv_cache.block_size)))
        prompt = ScheduledRequest.of(request, 0, tokens, blocks, 1)
        self.execute(SchedulerOutput([prompt]))
        request.token_ids.append(0)
        self.execute(SchedulerOutput([ScheduledRequest.of(request, tokens, 1, blocks, 1)]))
        self.execute(SchedulerOutput(finished_seq_ids=[request.seq_id]))

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> StepResult:
        kv_cache, sampler = self.kv_cache, self.sampler
        if kv_cache is None or sampler is None:
            raise RuntimeError("initialize_cache() must run before execute()")
        sampler.release(plan.finished_seq_ids)
        if self.thread_governor is not None:
            self.thread_governor.update()
        kv_cache.swap_out(plan.swap_out)  # first: the freed blocks may be written below
        kv_cache.swap_in(plan.swap_in)
        kv_cache.copy_blocks(plan.block_copies)
        if plan.is_empty:
            return StepResult([])
        inputs = prepare_inputs(plan, kv_cache.block_size, self.device, decode_batch=self.attention_kernel is None)
        attention = PagedAttention(kv_cache, inputs.attention, self.attention_kernel)
        logits = self.model(inputs.input_ids, inputs.positions, attention, inputs.logits_indices)
        seq_ids = list(chain.from_iterable(s.sample_seq_ids for s in plan.scheduled))
        params = list(chain.from_iterable(s.sample_params for s in plan.scheduled))
        tokens = sampler(logits, seq_ids, params)
        # Only when a row asks for them (None per row otherwise): most steps compute none.
        logprobs = sampler.logprobs(logits, tokens, params) if any(p.logprobs is not None for p in params) else None
        # A row holds a NaN or an infinity exactly when its sum is not finite (finite logits
        # overflow a float32 sum only beyond 1e33 each): one pass where isfinite().all() took five.
        finite = torch.isfinite(logits.sum(dim=-1)).tolist()
        out: list[tuple[int, ...]] = []
        failed: dict[int, str] = {}
        i = 0
        for row, s in enumerate(plan.scheduled):
            rows = slice(i, i + s.samples)
            row_logprobs = logprobs[rows] if logprobs is not None and s.request.params.logprobs is not None else None
            if all(finite[rows]):
                if row_logprobs is None:
                    out.append(tuple(tokens[rows]))
                else:  # a row's sequences share their request's logprobs setting: all are set
                    out.append(SampledTokens(tokens[rows], [lp for lp in row_logprobs if lp is not None]))
            else:  # NaN or inf logits fail this request alone (see Scheduler.update)
                out.append(())
                failed[row] = "FloatingPointError: non-finite logits"
            i += s.samples
        return StepResult(out, failed)
