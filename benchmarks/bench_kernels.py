"""The CPU kernels on SmolLM2-135M's shapes, cold, as a serving step meets them.

    python benchmarks/bench_kernels.py [--dtype bfloat16|float32] [--rows 1,12,64,128,256,512]

Three tables:
  - linear: all 30 layers' four weight shapes (every weight distinct, so they stream from memory
    as in a real step) for each row count, through ``models.layers.Linear``'s CPU kernel and
    through oneDNN's prepacked matmul, alternated, best of 5; the weight bytes per second and the
    ratio.
  - decode attention: one decode step of 12 sequences of 500-2100 tokens over 30 layers' caches
    (block size 16), blocks scattered over the pool and in order, best of 15; the cache bytes
    per second against a plain sequential read measured in the same run.
  - prefill attention: one prompt chunk (256 or 1024 new tokens, after 0 or 1024 cached ones) of
    one layer, best of 10, in GFLOP/s of its causal products (QK and PV).
A kernel microbenchmark must be cold: a cache that sits warm in L3 misleads (docs/benchmarks.md).
The prefill table is the exception: a chunk is bound by arithmetic and reads each key and value
once per 16-token tile, so in a real step too its layer's K/V (at most 3 MB here) sit in cache.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from functools import partial

import torch

import pagedkv.models.layers as layers
from pagedkv.models.cpu_kernel import load_cpu_kernel
from pagedkv.models.layers import Linear

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # qkv, o, gate_up, down
LAYERS = 30


def best(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def sequential_read_gb_s() -> float:
    """Bytes per second of summing a 256 MiB float32 tensor: what the memory gives a plain stream."""
    x = torch.randn(64 * 2**20)
    return x.numel() * 4 / best(x.sum, 5) / 1e9


def linear_table(dtype: torch.dtype, rows: list[int]) -> None:
    torch.manual_seed(0)
    stack = [Linear(i, o, bias=False).to(dtype) for _ in range(LAYERS) for i, o in SHAPES]
    weight_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in stack)
    print(f"\nlinear, {dtype}, {LAYERS} layers x {len(SHAPES)} shapes ({weight_bytes / 1e6:.0f} MB of weights)")
    print("| rows | kernel (ms) | oneDNN (ms) | kernel GB/s | oneDNN GB/s | oneDNN / kernel |")
    print("|---:|---:|---:|---:|---:|---:|")
    with torch.inference_mode():
        for n in rows:
            inputs = {i: torch.randn(n, i).to(dtype) for i, _ in SHAPES}

            def step(inputs: dict[int, torch.Tensor] = inputs) -> None:
                for layer in stack:
                    layer(inputs[layer.in_features])

            times: dict[str, list[float]] = {"kernel": [], "onednn": []}
            for _ in range(5):  # alternated: the machine's speed drifts
                for name, limit in (("kernel", 2**31), ("onednn", 0)):
                    layers.KERNEL_ROWS = limit
                    times[name].append(best(step, 1))
            kernel, onednn = min(times["kernel"]), min(times["onednn"])
            print(f"| {n} | {kernel * 1e3:.2f} | {onednn * 1e3:.2f} | {weight_bytes / kernel / 1e9:.1f} | "
                  f"{weight_bytes / onednn / 1e9:.1f} | {onednn / kernel:.2f}x |")


def attention_table(dtype: torch.dtype) -> None:
    kernels = load_cpu_kernel()
    assert kernels is not None, "the CPU kernels did not build"
    rng = random.Random(0)
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    contexts = [rng.randint(500, 2100) for _ in range(12)]
    widths = [-(-c // block_size) for c in contexts]
    blocks = sum(widths)
    caches = [(torch.randn(blocks, block_size, kv_heads, head_dim).to(dtype),
               torch.randn(blocks, block_size, kv_heads, head_dim).to(dtype)) for _ in range(LAYERS)]
    q = torch.randn(len(contexts), heads, head_dim).to(dtype)
    out = torch.empty_like(q)
    starts, lengths = torch.arange(len(contexts)), torch.tensor(contexts)
    ones = torch.ones(len(contexts), dtype=torch.int64)
    cache_bytes = sum(contexts) * kv_heads * head_dim * 2 * q.element_size() * LAYERS
    read = sequential_read_gb_s()
    print(f"\ndecode attention, {dtype}: 12 sequences of {min(contexts)}-{max(contexts)} tokens, {LAYERS} layers "
          f"({cache_bytes / 1e6:.0f} MB of K/V); a sequential read runs at {read:.1f} GB/s")
    print("| blocks | step (ms) | GB/s | share of a sequential read |")
    print("|---|---:|---:|---:|")
    for layout in ("scattered", "in order"):
        order = torch.randperm(blocks).tolist() if layout == "scattered" else list(range(blocks))
        tables = torch.zeros(len(contexts), max(widths), dtype=torch.int64)
        at = 0
        for i, w in enumerate(widths):
            tables[i, :w] = torch.tensor(order[at:at + w])
            at += w

        def step(tables: torch.Tensor = tables) -> None:
            for k, v in caches:
                kernels.paged_attention(q, k, v, out, tables, starts, ones, lengths)

        seconds = best(step, 15)
        rate = cache_bytes / seconds / 1e9
        print(f"| {layout} | {seconds * 1e3:.2f} | {rate:.1f} | {rate / read:.0%} |")


def prefill_table(dtype: torch.dtype) -> None:
    kernels = load_cpu_kernel()
    assert kernels is not None, "the CPU kernels did not build"
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    print(f"\nprefill attention, {dtype}: one sequence, one layer, {heads} query heads over {kv_heads} K/V heads "
          f"of {head_dim}, blocks scattered")
    print("| cached tokens | new tokens | ms | GFLOP/s |")
    print("|---:|---:|---:|---:|")
    for cached, new in ((0, 256), (0, 1024), (1024, 1024)):
        context = cached + new
        blocks = -(-context // block_size)
        k, v = (torch.randn(blocks, block_size, kv_heads, head_dim).to(dtype) for _ in range(2))
        table = torch.randperm(blocks).reshape(1, -1)
        q = torch.randn(new, heads, head_dim).to(dtype)
        out = torch.empty_like(q)
        chunk = partial(kernels.paged_attention, q, k, v, out, table, torch.tensor([0]), torch.tensor([new]),
                        torch.tensor([context]))
        chunk()
        seconds = best(chunk, 10)
        pairs = new * cached + new * (new + 1) // 2  # each new token sees the cached ones and itself
        print(f"| {cached} | {new} | {seconds * 1e3:.2f} | {4 * heads * head_dim * pairs / seconds / 1e9:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--rows", default="1,12,64,128,256,512", help="row counts for the linear table")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"{args.threads} threads, torch {torch.__version__}")
    linear_table(dtype, [int(r) for r in args.rows.split(",")])
    attention_table(dtype)
    prefill_table(dtype)


if __name__ == "__main__":
    main()
