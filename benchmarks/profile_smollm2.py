"""Where a serving step's time goes: the bench_smollm2 workload, broken down by what runs.

Every category is timed exclusively (a category's time excludes the categories running inside
it), per step kind: a *decode* step has one new token per sequence, a *prefill* step carries at
least one prompt chunk. Timers wrap the model's modules and the runner's functions from this
script only; the engine's code carries no instrumentation. On the CPU every op is synchronous,
so wall time around a call is that call's time.

    python benchmarks/profile_smollm2.py --dtype bfloat16
    python benchmarks/profile_smollm2.py --dtype float32 --requests 32
    python benchmarks/profile_smollm2.py --workload long     # bench_vllm_cpu's long prompts
    python benchmarks/profile_smollm2.py --modules           # every layer through its modules: by op

Decode steps run each layer as one C call (models.llama.FusedLayers), so without --modules their
linear layers, norms, RoPE, K/V writes and attention show as one category.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from bench_smollm2 import workload
from bench_vllm_cpu import long_workload

import pagedkv.models.attention as attention_module
import pagedkv.models.llama as llama
import pagedkv.models.runner as runner_module
from pagedkv.loader import load_model
from pagedkv.models import ModelRunner
from pagedkv.models.layers import RMSNorm
from pagedkv.scheduler import EngineConfig, LLMEngine, SamplingParams


class Timers:
    """Exclusive time per (step kind, category), with a stack for nesting."""

    def __init__(self) -> None:
        self.kind = "other"
        self.totals: dict[tuple[str, str], float] = defaultdict(float)
        self.steps: dict[str, list[float]] = defaultdict(list)
        self._stack: list[list[Any]] = []  # [category, start, time spent in children]

    def wrap(self, category: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [category, time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self._stack.pop()
                spent = time.perf_counter() - frame[1]
                self.totals[self.kind, category] += spent - frame[2]
                if self._stack:
                    self._stack[-1][2] += spent
        return timed


def instrument(model: torch.nn.Module, runner: ModelRunner, timers: Timers) -> None:
    for name, module in model.named_modules():
        if name.endswith(("_proj", "lm_head")):
            category = "linear: lm_head" if name == "lm_head" else "linear: layers"
        elif name.endswith(("layernorm", "norm")):
            category = "rmsnorm"
        elif name.endswith("embed_tokens"):
            category = "embedding"
        else:
            continue
        module.forward = timers.wrap(category, module.forward)  # type: ignore[method-assign]
    llama.Rotation.__call__ = timers.wrap("rope", llama.Rotation.__call__)  # the kernel's or rotate()
    attention_module.gather = timers.wrap("attention: gather", attention_module.gather)
    attention_module.attend = timers.wrap("attention: softmax(QK)V", attention_module.attend)
    attention_module.PagedAttention.__call__ = timers.wrap(  # type: ignore[method-assign]
        "attention: K/V write + indexing", attention_module.PagedAttention.__call__)
    kernels = runner.attention_kernel
    if kernels is not None:  # the CPU kernel runs inside PagedAttention.__call__; time it apart
        type(kernels).paged_attention = timers.wrap(  # type: ignore[method-assign]
            "attention: CPU kernel", type(kernels).paged_attention)
        type(kernels).llama_layer = timers.wrap(  # type: ignore[method-assign]
            "fused layers: C (all but silu(gate) * up)", type(kernels).llama_layer)
    llama.FusedLayers.of = staticmethod(timers.wrap("fused layers: setup", llama.FusedLayers.of))
    llama.FusedLayers.run = timers.wrap("activations, views, residuals", llama.FusedLayers.run)
    for module in model.modules():
        if isinstance(module, RMSNorm):  # its fused residual add + norm is a method of its own
            module.add_and_norm = timers.wrap("rmsnorm", module.add_and_norm)  # type: ignore[method-assign]
    runner_module.prepare_inputs = timers.wrap("input preparation", runner_module.prepare_inputs)
    assert runner.sampler is not None
    type(runner.sampler).__call__ = timers.wrap("sampling", type(runner.sampler).__call__)  # type: ignore[method-assign]
    for cls in {type(m) for m in model.modules() if type(m).__name__.endswith(("MLP", "Attention"))}:
        cls.forward = timers.wrap("activations, views, residuals", cls.forward)
    model.forward = timers.wrap("model: other", model.forward)  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--workload", choices=["mixed", "long"], default="mixed",
                        help="bench_smollm2's 64 mixed requests, or bench_vllm_cpu's 12 long ones")
    parser.add_argument("--requests", type=int, help="how many requests (default: 64 mixed, 12 long)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modules", action="store_true",
                        help="run every layer through its modules, not as one C call (FusedLayers): a breakdown by op")
    args = parser.parse_args()

    model, tok = load_model("smollm2-135m", dtype=getattr(torch, args.dtype), device="cpu")
    model.fused_cpu_layers = not args.modules
    if args.workload == "mixed":
        prompts, lengths = workload(tok, args.requests or 64, args.seed)
    else:
        prompts, lengths = long_workload(tok, args.requests or 12, args.seed)
    runner = ModelRunner(model)
    engine = LLMEngine(runner, EngineConfig(block_size=16, max_num_batched_tokens=1024, kv_cache_memory_bytes=2 << 30))
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    engine.generate(prompts[:2], params[:2])  # warm-up

    timers = Timers()
    instrument(model, runner, timers)
    execute = runner.execute

    def timed_execute(plan: Any) -> Any:
        timers.kind = "prefill" if any(s.num_new_tokens > 1 for s in plan.scheduled) else "decode"
        start = time.perf_counter()
        try:
            return timers.wrap("runner: other", execute)(plan)
        finally:
            timers.steps[timers.kind].append(time.perf_counter() - start)

    runner.execute = timed_execute  # type: ignore[method-assign]
    start = time.perf_counter()
    engine.generate(prompts, params)
    wall = time.perf_counter() - start

    kinds = ["prefill", "decode"]
    executed = {k: sum(timers.steps[k]) for k in kinds}
    print(f"SmolLM2-135M {args.dtype}, {len(prompts)} requests, {sum(lengths)} new tokens: {wall:.2f} s wall, "
          f"{sum(executed.values()):.2f} s in the runner; "
          + ", ".join(f"{len(timers.steps[k])} {k} steps ({executed[k]:.2f} s)" for k in kinds))
    categories = sorted({c for _, c in timers.totals}, key=lambda c: -sum(timers.totals[k, c] for k in kinds))
    print(f"\n| category | {' | '.join(f'{k} (s) | {k} share' for k in kinds)} |")
    print("|---|" + "---:|" * (2 * len(kinds)))
    for c in categories:
        cells = [f"{timers.totals[k, c]:.2f} | {timers.totals[k, c] / max(executed[k], 1e-9):.0%}" for k in kinds]
        print(f"| {c} | {' | '.join(cells)} |")
    outside = wall - sum(executed.values())
    print(f"| scheduler, engine, detokenization (outside the runner) | {outside:.2f} s in all | |")


if __name__ == "__main__":
    main()
