"""Sharing pages on SmolLM2-135M.

1. Prefix caching: 32 requests that share a 256-token system prompt and differ in their
   questions, with the cache on and off: prompt tokens, prefill tokens actually computed,
   the prefix hit rate, wall time and tokens/s, and a check that both give the same
   greedy tokens.
2. Parallel sampling: one such prompt sampled n = 8 times, as one ``n = 8`` request (one
   prefill, forks sharing its blocks) and as 8 separate requests seeded seed + i with the
   prefix cache off: prefill tokens, peak KV blocks, time, and a check that the samples are
   the same.

    python benchmarks/bench_prefix.py [--requests 32] [--prefix 256] [--max-tokens 16] [--n 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from pagedkv.loader import load_model
from pagedkv.models.runner import ModelRunner
from pagedkv.scheduler import EngineConfig, LLMEngine, SamplingParams

SYSTEM = ("You are a careful assistant for a public library. Answer briefly and politely. "
          "The library opens at nine and closes at six on weekdays, and at four on Saturdays. ")
TOPICS = ["poetry", "the moon", "bread", "rivers", "chess", "owls", "maps", "tea", "rain", "clocks", "glass", "bees",
          "salt", "kites", "caves", "ink"]


def workload(tokenizer, num_requests: int, prefix_len: int) -> list[list[int]]:
    system = tokenizer.encode(SYSTEM * 40)[:prefix_len]
    return [system + tokenizer.encode(f" Question {i}: tell me one fact about {TOPICS[i % len(TOPICS)]}.")
            for i in range(num_requests)]


def prefill_computed(stats, outputs) -> int:
    """Tokens computed for prompts (recomputations included): every computed token except
    those fed back to decode, one per generated token after each sequence's first."""
    return stats.num_tokens_computed - sum(len(s.output_token_ids) - 1 for o in outputs for s in o.outputs)


def timed(model, config: EngineConfig, prompts, params):
    """Generate on a fresh engine; return the outputs, the seconds taken, the stats and the
    prefill tokens computed."""
    engine = LLMEngine(ModelRunner(model), config)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - start
    stats = engine.stats()
    return outputs, seconds, stats, prefill_computed(stats, outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="samples of one prompt in the parallel-sampling part")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    prompts = workload(tokenizer, args.requests, args.prefix)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    print(f"{len(prompts)} requests, {args.prefix}-token shared prefix, {sum(map(len, prompts))} prompt tokens, "
          f"{args.max_tokens} new tokens each; SmolLM2-135M float32, {torch.get_num_threads()} threads\n")
    print(f"{'prefix caching':<15} {'prefill computed':>16} {'hit rate':>9} {'time (s)':>9} {'tok/s':>7}")
    results = {}
    for caching in (False, True):
        outputs, seconds, stats, prefill = timed(model, EngineConfig(enable_prefix_caching=caching), prompts, params)
        results[caching] = [o.output_token_ids for o in outputs], seconds
        print(f"{'on' if caching else 'off':<15} {prefill:>16} {stats.prefix_hit_rate:>9.1%} {seconds:>9.2f} "
              f"{stats.num_generated_tokens / seconds:>7.1f}")
    same = sum(a == b for a, b in zip(results[False][0], results[True][0], strict=True))
    print(f"\nspeedup {results[False][1] / results[True][1]:.2f}x; same greedy tokens: {same}/{len(prompts)}")
    parallel_sampling(model, prompts[0], args.n, args.max_tokens)


def parallel_sampling(model, prompt: list[int], n: int, max_tokens: int) -> None:
    params = SamplingParams(temperature=0.8, n=n, seed=0, max_tokens=max_tokens, ignore_eos=True)
    print(f"\none {len(prompt)}-token prompt, {n} samples of {max_tokens} tokens (temperature 0.8, seed 0)\n")
    print(f"{'as':<24} {'prefill computed':>16} {'peak KV blocks':>15} {'time (s)':>9}")
    samples = {}
    for label, prompts, sps in (
        (f"{n} separate requests", [prompt] * n, [params.for_sequence(i) for i in range(n)]),
        (f"one request, n={n}", [prompt], [params]),
    ):
        outputs, seconds, stats, prefill = timed(model, EngineConfig(enable_prefix_caching=False), prompts, sps)
        samples[label] = [s.output_token_ids for o in outputs for s in o.outputs]
        print(f"{label:<24} {prefill:>16} {stats.kv_blocks_peak:>15} {seconds:>9.2f}")
    a, b = samples.values()
    same = sum(x == y for x, y in zip(a, b, strict=True))
    print(f"\nsame samples: {same}/{n}; distinct samples: {len(set(map(tuple, b)))}/{n}")


if __name__ == "__main__":
    main()
