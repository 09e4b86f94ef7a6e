"""Prefix caching on a shared-prefix workload: 32 requests that share a 256-token system
prompt and differ in their questions, on SmolLM2-135M, with the cache on and off.

Prints prompt tokens, prefill tokens actually computed, the prefix hit rate, wall time and
tokens/s for each, and checks that both give the same greedy tokens.

    python benchmarks/bench_prefix.py [--requests 32] [--prefix 256] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import time

import torch

from models.registry import load_model
from models.runner import ModelRunner
from scheduler import EngineConfig, LLMEngine, SamplingParams

SYSTEM = ("You are a careful assistant for a public library. Answer briefly and politely. "
          "The library opens at nine and closes at six on weekdays, and at four on Saturdays. ")
TOPICS = ["poetry", "the moon", "bread", "rivers", "chess", "owls", "maps", "tea", "rain", "clocks", "glass", "bees",
          "salt", "kites", "caves", "ink"]


def workload(tokenizer, num_requests: int, prefix_len: int) -> list[list[int]]:
    system = tokenizer.encode(SYSTEM * 40)[:prefix_len]
    return [system + tokenizer.encode(f" Question {i}: tell me one fact about {TOPICS[i % len(TOPICS)]}.")
            for i in range(num_requests)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    prompts = workload(tokenizer, args.requests, args.prefix)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    print(f"{len(prompts)} requests, {args.prefix}-token shared prefix, {sum(map(len, prompts))} prompt tokens, "
          f"{args.max_tokens} new tokens each; SmolLM2-135M float32, {torch.get_num_threads()} threads\n")
    print(f"{'prefix caching':<15} {'prefill computed':>16} {'hit rate':>9} {'time (s)':>9} {'tok/s':>7}")
    results = {}
    for caching in (False, True):
        engine = LLMEngine(ModelRunner(model), EngineConfig(enable_prefix_caching=caching))
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
        seconds = time.perf_counter() - start
        stats = engine.stats()
        prefill = stats.num_tokens_computed - stats.num_generated_tokens + len(prompts)  # each prompt's last token samples
        results[caching] = [o.output_token_ids for o in outputs], seconds
        print(f"{'on' if caching else 'off':<15} {prefill:>16} {stats.prefix_hit_rate:>9.1%} {seconds:>9.2f} "
              f"{stats.num_generated_tokens / seconds:>7.1f}")
    same = sum(a == b for a, b in zip(results[False][0], results[True][0]))
    print(f"\nspeedup {results[False][1] / results[True][1]:.2f}x; same greedy tokens: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
