"""What running each Llama layer as one C call (models.llama.FusedLayers) buys end to end: the same
requests through the same engine configuration with the fused layers and through the modules,
alternated in one process (this machine's speed drifts by the minute), with the tokens compared.

    python benchmarks/bench_fused.py                                   # mixed workload, float32
    python benchmarks/bench_fused.py --dtype bfloat16 --workload long --repeats 2
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_smollm2 import workload
from bench_vllm_cpu import long_workload, run_pagedkv

from pagedkv.loader import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--workload", choices=["mixed", "long"], default="mixed")
    parser.add_argument("--repeats", type=int, default=4, help="runs of each, alternated")
    args = parser.parse_args()

    model, tok = load_model("smollm2-135m", dtype=getattr(torch, args.dtype), device="cpu")
    prompts, lengths = workload(tok, 64, 0) if args.workload == "mixed" else long_workload(tok, 12, 0)
    variants = {"fused layers": True, "modules": False}  # model.fused_cpu_layers
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, list[list[int]]] = {}
    for repeat in range(args.repeats):
        for name in list(variants)[:: 1 if repeat % 2 else -1]:  # modules first, then the other way round
            model.fused_cpu_layers = variants[name]
            elapsed, tokens[name] = run_pagedkv(model, prompts, lengths)
            seconds[name].append(elapsed)
            print(f"  {name}: {elapsed:.2f} s", flush=True)

    print(f"\nSmolLM2-135M {args.dtype}, {args.workload} workload ({len(prompts)} requests, {sum(lengths)} new "
          f"tokens), {args.repeats} alternating runs each")
    print("| path | median (s) | min-max (s) | tok/s |\n|---|---:|---:|---:|")
    for name, runs in seconds.items():
        median = statistics.median(runs)
        print(f"| {name} | {median:.2f} | {min(runs):.2f}-{max(runs):.2f} | {sum(lengths) / median:.1f} |")
    ratio = statistics.median(seconds["fused layers"]) / statistics.median(seconds["modules"])
    same = sum(a == b for a, b in zip(tokens["fused layers"], tokens["modules"], strict=True))
    print(f"fused / modules time: {ratio:.2f}x; same tokens in {same}/{len(prompts)} requests")


if __name__ == "__main__":
    main()
