"""What a K/V cache buys: the same model and prompts, generated four ways.

  (a) no cache: recompute the whole sequence for every new token
  (b) contiguous cache: one K/V tensor per layer per request, grown by torch.cat
  (c) paged engine, one request at a time (max_num_seqs=1)
  (d) paged engine, every request at once (continuous batching)

All four are greedy with the same weights, so they must produce the same tokens; the
script checks that and prints tokens/s with ratios against (a) and (b).

    python benchmarks/bench_cache.py                 # GPT-2-small shape, 8 prompts x 48 tokens
    python benchmarks/bench_cache.py --requests 4 --new-tokens 16 --preset tiny
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time

import torch

from models import GPT, ModelRunner, generate_contiguous_cache, generate_no_cache
from scheduler import EngineConfig, LLMEngine, SamplingParams


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed_sequential(fn, model, prompts, new_tokens, label):
    outputs, start = [], time.perf_counter()
    for i, prompt in enumerate(prompts):
        outputs.append(fn(model, prompt, new_tokens))
        print(f"  {label}: request {i + 1}/{len(prompts)} done, {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return outputs, time.perf_counter() - start


def timed_engine(model, prompts, new_tokens, max_num_seqs, block_size):
    engine = LLMEngine(ModelRunner(model), EngineConfig(block_size=block_size, max_num_seqs=max_num_seqs))
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    return [o.output_token_ids for o in outputs], time.perf_counter() - start, engine.stats()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = GPT.from_preset(args.preset, seed=args.seed)
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(model.vocab_size) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
        for _ in range(args.requests)
    ]
    generated = args.requests * args.new_tokens
    print(
        f"{args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, float32, random weights) on "
        f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n"
        f"{args.requests} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
        f"{args.new_tokens} new tokens each, greedy\n"
    )

    # One short untimed run of every method first: torch's first calls pay one-time setup.
    for fn in (generate_no_cache, generate_contiguous_cache):
        fn(model, prompts[0][:8], 2)
    timed_engine(model, [prompts[0][:8]] * 2, 2, 2, args.block_size)

    rows = []
    out_a, t_a = timed_sequential(generate_no_cache, model, prompts, args.new_tokens, "(a)")
    rows.append(("(a) no cache, one at a time", t_a, out_a))
    out_b, t_b = timed_sequential(generate_contiguous_cache, model, prompts, args.new_tokens, "(b)")
    rows.append(("(b) contiguous cache, one at a time", t_b, out_b))
    out_c, t_c, _ = timed_engine(model, prompts, args.new_tokens, 1, args.block_size)
    rows.append(("(c) paged engine, one at a time", t_c, out_c))
    out_d, t_d, stats = timed_engine(model, prompts, args.new_tokens, args.requests, args.block_size)
    rows.append((f"(d) paged engine, {args.requests} at once", t_d, out_d))

    print(f"{'method':<38} {'time (s)':>9} {'tok/s':>8} {'vs (a)':>7} {'vs (b)':>7}")
    for label, seconds, _ in rows:
        print(f"{label:<38} {seconds:9.2f} {generated / seconds:8.1f} {t_a / seconds:6.1f}x {t_b / seconds:6.1f}x")
    same = all(out == out_a for _, _, out in rows)
    print(f"\nidentical greedy tokens across all four: {'yes' if same else 'NO'}")
    print(f"(d) peak KV pages: {stats.kv_blocks_peak} of {stats.kv_blocks_total} (block size {args.block_size})")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
