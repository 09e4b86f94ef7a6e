"""What a K/V cache buys: the same model and prompts, generated several ways.

  (a) no cache: recompute the whole sequence for every new token
  (b) contiguous cache: one K/V tensor per layer per request, grown by torch.cat
  (c) paged engine, one request at a time (max_num_seqs=1)
  (d) paged engine, every request at once (continuous batching)
  (e) transformers' own generate, one request at a time    (real models only)
  (f) transformers' own generate, all requests in one left-padded batch

All rows are greedy with the same weights, so they should produce the same tokens; the
script reports how many requests agree with (a) and prints tokens/s with ratios.

    python benchmarks/bench_cache.py                         # GPT-2-small shape, random weights
    python benchmarks/bench_cache.py --model smollm2-135m    # SmolLM2-135M-Instruct, real chat prompts
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time

import torch

from pagedkv.loader import load_model
from pagedkv.models import GPT, GPT_PRESETS, ModelRunner, generate_contiguous_cache, generate_no_cache
from pagedkv.scheduler import EngineConfig, LLMEngine, SamplingParams


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


def hf_generate(hf, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' generate on a left-padded batch, EOS off, greedy."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[:, width:].tolist()


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def load(args) -> tuple[torch.nn.Module, list[list[int]], str, object]:
    """The model, the prompts, a description, and transformers' copy of the model (real models)."""
    rng = random.Random(args.seed)
    if args.model in GPT_PRESETS:
        model = GPT.from_preset(args.model, seed=args.seed)
        prompts = [
            [rng.randrange(model.vocab_size) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
            for _ in range(args.requests)
        ]
        return model, prompts, "random weights", None
    from bench_smollm2 import workload  # real chat prompts of mixed length
    from transformers import AutoModelForCausalLM

    from pagedkv.models.gguf import smollm2_path

    model, tok = load_model(args.model, dtype=torch.float32, device="cpu")
    prompts, _ = workload(tok, args.requests, args.seed)
    path = smollm2_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return model, prompts, "GGUF weights", hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-small", help=f"{', '.join(GPT_PRESETS)} or smollm2-135m")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--min-prompt", type=int, default=16, help="random-weight models only")
    parser.add_argument("--max-prompt", type=int, default=128, help="random-weight models only")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model, prompts, weights, hf = load(args)
    n = args.new_tokens
    generated = args.requests * n
    print(
        f"{args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, float32, {weights}) on "
        f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n"
        f"{args.requests} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
        f"{n} new tokens each, greedy\n"
    )

    # One short untimed run of every method first: torch's first calls pay one-time setup.
    for fn in (generate_no_cache, generate_contiguous_cache):
        fn(model, prompts[0][:8], 2)
    timed_engine(model, [prompts[0][:8]] * 2, 2, 2, args.block_size)

    rows = []
    out, t_a = timed_sequential(generate_no_cache, model, prompts, n, "(a)")
    rows.append(("(a) no cache, one at a time", t_a, out))
    out, t_b = timed_sequential(generate_contiguous_cache, model, prompts, n, "(b)")
    rows.append(("(b) contiguous cache, one at a time", t_b, out))
    out, seconds, _ = timed_engine(model, prompts, n, 1, args.block_size)
    rows.append(("(c) paged engine, one at a time", seconds, out))
    out, seconds, stats = timed_engine(model, prompts, n, args.requests, args.block_size)
    rows.append((f"(d) paged engine, {args.requests} at once", seconds, out))
    if hf is not None:
        hf_generate(hf, [prompts[0][:8]], 2)
        out, seconds = timed(lambda: [hf_generate(hf, [p], n)[0] for p in prompts])
        rows.append(("(e) transformers generate, one at a time", seconds, out))
        out, seconds = timed(hf_generate, hf, prompts, n)
        rows.append((f"(f) transformers generate, {args.requests} padded", seconds, out))

    reference = rows[0][2]
    print(f"{'method':<42} {'time (s)':>9} {'tok/s':>8} {'vs (a)':>7} {'vs (b)':>7} {'same as (a)':>12}")
    for label, seconds, out in rows:
        same = sum(x == y for x, y in zip(out, reference, strict=True))
        print(f"{label:<42} {seconds:9.2f} {generated / seconds:8.1f} {t_a / seconds:6.1f}x {t_b / seconds:6.1f}x "
              f"{same:>8}/{len(out)}")
    print(f"\n(d) peak KV pages: {stats.kv_blocks_peak} of {stats.kv_blocks_total} (block size {args.block_size})")


if __name__ == "__main__":
    main()
