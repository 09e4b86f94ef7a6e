"""Serving SmolLM2-135M-Instruct on the CPU: pagedkv against transformers, same requests.

64 chat requests of mixed prompt lengths, each asking for its own number of new tokens
(16-128, EOS ignored so that every system does the same work), all greedy:

  transformers generate, static batches of 16   (left-padded; a batch runs to its longest request)
  transformers continuous batching               (its ContinuousBatchingManager, per-request lengths)
  pagedkv, float32 and bfloat16                  (all 64 handed to the engine at once)

Also printed: the matmul floor, i.e. the time the workload's matrix products alone (linear layers
and attention's) would take at the GEMM rate this machine sustains on large fp32/bf16 matrices (the
better of MKL and oneDNN), measured in the same run.

    python benchmarks/bench_smollm2.py                  # all rows (about 6 minutes on 2 cores)
    python benchmarks/bench_smollm2.py --skip-hf        # pagedkv rows only
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from pagedkv.loader import load_model
from pagedkv.models import ModelRunner
from pagedkv.scheduler import EngineConfig, LLMEngine, SamplingParams

TOPICS = [
    "the ocean", "machine learning", "the history of Rome", "cooking pasta", "quantum physics", "gardening",
    "jazz music", "the moon landing", "climate change", "chess strategy", "the French revolution", "volcanoes",
    "honey bees", "the stock market", "ancient Egypt", "electric cars",
]
STYLES = [
    "Explain {t} to a child.",
    "Write a short poem about {t}.",
    "Give me five facts about {t}.",
    "Summarize the most important ideas about {t} in a paragraph, with examples, and explain why they matter today.",
]


def workload(tok, n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Chat prompts of mixed length (some carry a long list of extra topics) and output lengths."""
    rng = random.Random(seed)
    prompts, lengths = [], []
    for _ in range(n):
        question = rng.choice(STYLES).format(t=rng.choice(TOPICS))
        if rng.random() < 0.3:
            question += " Also consider: " + ", ".join(rng.choice(TOPICS) for _ in range(rng.randint(10, 60))) + "."
        prompts.append(tok.encode(tok.apply_chat_template([{"role": "user", "content": question}])))
        lengths.append(rng.randint(16, 128))
    return prompts, lengths


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_pagedkv(model, prompts, lengths) -> tuple[float, list[list[int]]]:
    engine = LLMEngine(ModelRunner(model), EngineConfig(block_size=16, max_num_batched_tokens=1024))
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    engine.generate(prompts[:2], params[:2])  # warm-up
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    return time.perf_counter() - start, [o.output_token_ids for o in outputs]


def run_hf_static(hf, prompts, lengths, batch_size: int) -> tuple[float, list[list[int]]]:
    outs: list[list[int]] = []
    hf.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk, want = prompts[i : i + batch_size], lengths[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            gen = hf.generate(ids, attention_mask=mask, max_new_tokens=max(want), do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        outs += [row[width : width + n].tolist() for row, n in zip(gen, want, strict=True)]
        log(f"  transformers static: {min(i + batch_size, len(prompts))}/{len(prompts)} requests, "
            f"{time.perf_counter() - start:.0f} s")
    return time.perf_counter() - start, outs


def run_hf_continuous(hf, prompts, lengths) -> tuple[float, list[list[int]]]:
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=max(lengths), pad_token_id=0)
    manager = hf.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        start = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=n, eos_token_id=-1) for p, n in zip(prompts, lengths, strict=True)]
        results = {}
        while len(results) < len(ids):  # results arrive in finishing order
            result = manager.get_result(timeout=600)
            if result is None:
                raise RuntimeError("transformers' continuous batching stopped without finishing every request")
            results[result.request_id] = result
        seconds = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    return seconds, [list(results[rid].generated_tokens) for rid in ids]


def gemm_rate(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """GFLOP/s of a large matmul sustained for ``seconds``, the best this machine's BLAS libraries
    do: PyTorch's own ``a @ b`` (MKL for float32 here) or oneDNN with a prepacked weight (what
    pagedkv's Linear uses), whichever is faster in this run. Sustained, because a workload runs for
    seconds: the median of 10-multiply windows. The best single window of a 50-ms burst read up to
    651 GFLOP/s in float32 where the same multiply sustains about 400 for a second (2026-12-02),
    which made every ratio to the floor move with the burst's luck."""
    a, b = torch.randn(1024, 576, dtype=dtype), torch.randn(576, 3072, dtype=dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), 1024)
    best = 0.0
    for multiply in (lambda: a @ b, lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")):
        for _ in range(3):
            multiply()
        windows, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            begun, reps = time.perf_counter(), 10
            for _ in range(reps):
                multiply()
            windows.append(2 * 1024 * 576 * 3072 * reps / (time.perf_counter() - begun) / 1e9)
        best = max(best, statistics.median(windows))
    return best


def layer_params(model) -> int:
    """The weights of the decoder layers' linear layers (the vocabulary projection apart)."""
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2)


def attention_flops_per_key(model) -> float:
    """One query against one key and its value, in every head of every layer: 4 * heads * head_dim * layers."""
    config = model.config
    return 4.0 * config.num_attention_heads * config.head_dim * config.num_hidden_layers


def linear_flops(model, prompts, lengths) -> float:
    """Linear-layer FLOPs of the workload: every computed token (a prompt's tokens, then each new
    token but the last) through every layer, plus the vocabulary projection for each generated token."""
    computed = sum(len(p) + n - 1 for p, n in zip(prompts, lengths, strict=True))
    return 2.0 * (computed * layer_params(model) + sum(lengths) * model.lm_head.weight.numel())


def attention_flops(model, prompts, lengths) -> float:
    """Attention's own matrix products: a token at position i multiplies its query by i + 1 keys
    and its weights by as many values, 4 * heads * head_dim * (i + 1) FLOPs a layer; a request
    computes positions 0 .. prompt + new - 2. Small for short chats (3% of the mixed workload's),
    not for long prompts (18% of the long one's)."""
    keys = sum((len(p) + n - 1) * (len(p) + n) / 2 for p, n in zip(prompts, lengths, strict=True))
    return attention_flops_per_key(model) * keys


def matmul_flops(model, prompts, lengths) -> float:
    """The workload's matrix products, linear layers and attention's (QK and PV) alike."""
    return linear_flops(model, prompts, lengths) + attention_flops(model, prompts, lengths)


def step_bound(model, prompts, lengths, gemm_gflops: float, read_gb_s: float) -> float:
    """Seconds below which no engine can serve the workload on this machine, where the matmul floor
    is too kind: decode steps read more than they compute. The prompts' products (linear layers and
    attention) at the GEMM rate; then the decode steps at the slower of their products at that rate
    and their reads at the sequential-read rate: every weight once a step, for as many steps as the
    longest request decodes, and each decoded token's K/V context once."""
    config, size = model.config, model.lm_head.weight.element_size()
    params, head, per_key = layer_params(model), model.lm_head.weight.numel(), attention_flops_per_key(model)
    kv_bytes = 2 * config.num_key_value_heads * config.head_dim * config.num_hidden_layers * size
    prefill = sum(2 * len(p) * params + 2 * head + per_key * len(p) * (len(p) + 1) / 2 for p in prompts)
    keys = sum((n - 1) * len(p) + n * (n - 1) / 2 for p, n in zip(prompts, lengths, strict=True))  # decode reads
    decode = sum(n - 1 for n in lengths) * (2 * params + 2 * head) + per_key * keys
    reads = (max(lengths) - 1) * (params + head) * size + keys * kv_bytes
    return prefill / (gemm_gflops * 1e9) + max(decode / (gemm_gflops * 1e9), reads / (read_gb_s * 1e9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--static-batch", type=int, default=16)
    parser.add_argument("--skip-hf", action="store_true", help="skip the transformers rows")
    args = parser.parse_args()

    model, tok = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    prompts, lengths = workload(tok, args.requests, args.seed)
    generated = sum(lengths)
    print(
        f"SmolLM2-135M-Instruct on {torch.get_num_threads()} CPU threads, torch {torch.__version__}: "
        f"{len(prompts)} requests, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens "
        f"({sum(map(len, prompts))} total), {generated} new tokens (16-128 each), greedy\n"
    )
    rows: list[tuple[str, float, list[list[int]] | None]] = []
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM

        from pagedkv.models.gguf import smollm2_path

        path = smollm2_path()
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None
        log("transformers, static batches ...")
        rows.append((f"transformers generate, static batches of {args.static_batch}",
                     *run_hf_static(hf, prompts, lengths, args.static_batch)))
        log("transformers, continuous batching ...")
        rows.append(("transformers continuous batching", *run_hf_continuous(hf, prompts, lengths)))
        del hf
    log("pagedkv float32 ...")
    rows.append(("pagedkv, float32", *run_pagedkv(model, prompts, lengths)))
    log("pagedkv bfloat16 ...")
    rows.append(("pagedkv, bfloat16", *run_pagedkv(model.to(torch.bfloat16), prompts, lengths)))

    flops = matmul_flops(model, prompts, lengths)
    floors = {dtype: flops / (gemm_rate(dtype) * 1e9) for dtype in (torch.float32, torch.bfloat16)}
    reference = next(out for label, _, out in rows if label == "pagedkv, float32")
    print(f"{'system':<46} {'time (s)':>9} {'tok/s':>7} {'vs floor':>9} {'same tokens as pagedkv fp32':>28}")
    for label, seconds, out in rows:
        floor = floors[torch.bfloat16 if "bfloat16" in label else torch.float32]
        same = sum(a == b for a, b in zip(out, reference, strict=True))
        print(f"{label:<46} {seconds:9.1f} {generated / seconds:7.1f} {seconds / floor:8.2f}x {same:>20}/{len(out)}")
    for dtype, floor in floors.items():
        print(f"{'matmul floor, ' + str(dtype).removeprefix('torch.'):<46} {floor:9.1f} {generated / floor:7.1f}"
              f"   ({flops / 1e12:.2f} TFLOP at {flops / floor / 1e9:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
