"""``pagedkv demo``: several requests of different lengths generated together through the
paged cache, each printed as it finishes, then a one-line summary."""

from __future__ import annotations

import random
import time

import torch

from models import GPT, ModelRunner
from scheduler import EngineConfig, LLMEngine, RequestOutput, SamplingParams


def run_demo(preset: str, num_requests: int, max_tokens: int, block_size: int, seed: int) -> None:
    model = GPT.from_preset(preset, seed=seed)
    engine = LLMEngine(ModelRunner(model), EngineConfig(block_size=block_size, seed=seed))
    rng = random.Random(seed)
    prompts = [[rng.randrange(model.vocab_size) for _ in range(rng.randint(4, 200))] for _ in range(num_requests)]
    params = [
        SamplingParams(temperature=0.8, top_p=0.95, max_tokens=rng.randint(max_tokens // 4, max_tokens), ignore_eos=True)
        for _ in prompts
    ]
    print(
        f"{preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters (random weights), "
        f"{torch.get_num_threads()} threads; {num_requests} requests, "
        f"KV pool {engine.kv_manager.num_blocks} blocks of {block_size} tokens"
    )
    start = time.perf_counter()

    def show(out: RequestOutput) -> None:
        if out.finished:
            m = out.metrics
            tokens = " ".join(map(str, out.output_token_ids[:8]))
            print(
                f"  {out.request_id:>11}: {m.num_prompt_tokens:3d} prompt -> {len(out.output_token_ids):3d} new tokens "
                f"({out.finish_reason.value}), TTFT {m.ttft:5.2f} s, done at {m.finish_time - m.arrival_time:5.2f} s: "
                f"[{tokens} ...]"
            )

    outputs = engine.generate(prompts, params, on_output=show)
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    generated = sum(len(o.output_token_ids) for o in outputs)
    kib = engine.executor.kv_cache.spec.bytes_per_block(block_size) / 1024
    print(
        f"{num_requests} requests, {generated} tokens in {elapsed:.2f} s: {generated / elapsed:.1f} tok/s; "
        f"KV pages used: peak {stats.kv_blocks_peak} of {stats.kv_blocks_total} ({kib:.0f} KiB each), "
        f"{stats.num_preemptions} preemptions"
    )
