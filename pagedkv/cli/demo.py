"""The text-generation commands: ``pagedkv demo``, ``pagedkv generate`` and ``pagedkv chat``."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Sequence

import torch

from pagedkv.loader import load_engine
from pagedkv.scheduler import EngineStats, LLMEngine, SamplingParams
from pagedkv.cli.live import LiveView

DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for writing clean Python code.",
    "What is a prime number? Give two examples.",
    "Write a short, friendly email inviting a colleague to lunch on Friday.",
]


def summary(engine: LLMEngine, num_requests: int, generated: int, seconds: float) -> str:
    stats: EngineStats = engine.stats()
    kib = engine.executor.kv_cache.spec.bytes_per_block(engine.config.block_size) / 1024
    return (
        f"{num_requests} requests, {generated} tokens in {seconds:.2f} s: {generated / seconds:.1f} tok/s; "
        f"KV pages used: peak {stats.kv_blocks_peak} of {stats.kv_blocks_total} "
        f"({engine.config.block_size} tokens, {kib:.0f} KiB each), {stats.num_preemptions} preemptions"
    )


def run_batch(engine: LLMEngine, prompts: Sequence[str | list[int]], params: SamplingParams, labels: list[str]) -> None:
    """Generate ``prompts`` together, streaming into a live view, then print the summary."""
    ids = [f"generate-{i}" for i in range(len(prompts))]
    # generate() numbers its requests the same way, so the view can find them.
    view = LiveView({rid: label for rid, label in zip(ids, labels)})
    start = time.perf_counter()
    outputs = engine.generate(list(prompts), params, on_output=lambda o: view(o))
    view.finish()
    generated = sum(len(o.output_token_ids) for o in outputs)
    print(summary(engine, len(prompts), generated, time.perf_counter() - start))


def open_engine(model: str, block_size: int, seed: int) -> LLMEngine:
    print(f"loading {model} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    engine = load_engine(model, block_size=block_size, seed=seed)
    runner = engine.executor
    params = sum(p.numel() for p in runner.model.parameters()) / 1e6
    print(
        f"{model}: {params:.0f}M parameters, {runner.model.dtype}, {runner.device}, {torch.get_num_threads()} threads, "
        f"loaded in {time.perf_counter() - start:.1f} s; KV pool {engine.kv_manager.num_blocks} blocks "
        f"of {block_size} tokens",
        file=sys.stderr,
    )
    return engine


def run_demo(model: str, max_tokens: int, block_size: int, seed: int) -> None:
    engine = open_engine(model, block_size, seed)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    if engine.tokenizer is not None:
        tok = engine.tokenizer
        prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in DEMO_QUESTIONS]
        labels = [f"Q: {q}" for q in DEMO_QUESTIONS]
    else:  # a random-weight model: random token prompts of different lengths
        rng = random.Random(seed)
        prompts = [[rng.randrange(engine.executor.vocab_size) for _ in range(rng.randint(4, 200))] for _ in range(6)]
        labels = [f"[{len(p)}-token prompt]" for p in prompts]
        params = params.model_copy(update={"ignore_eos": True})
    run_batch(engine, prompts, params, labels)


def run_generate(model: str, prompts: list[str], params: SamplingParams, chat: bool, block_size: int, seed: int) -> None:
    engine = open_engine(model, block_size, seed)
    if engine.tokenizer is None:
        raise ValueError(f"{model} has no tokenizer; use smollm2-135m or a .gguf file for text")
    texts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) if chat else p for p in prompts]
    if params.n > 1:  # several samples per prompt: printed whole, each under its label
        start = time.perf_counter()
        outs = engine.generate(texts, params)
        for i, out in enumerate(outs):
            for s in out.outputs:
                print(f"[{i}.{s.index}] {s.text.strip()}\n")
        tokens = sum(len(s.output_token_ids) for o in outs for s in o.outputs)
        print(summary(engine, len(outs), tokens, time.perf_counter() - start), file=sys.stderr)
        return
    if len(texts) > 1:
        run_batch(engine, texts, params, [f"[{i}]" for i in range(len(texts))])
        return
    start = time.perf_counter()
    out = engine.generate(texts, params, on_output=lambda o: print(o.new_text, end="", flush=True))[0]
    print()
    print(summary(engine, 1, len(out.output_token_ids), time.perf_counter() - start), file=sys.stderr)


def run_chat(model: str, params: SamplingParams, block_size: int, seed: int) -> None:
    """A short interactive chat: each turn re-sends the conversation through the template."""
    engine = open_engine(model, block_size, seed)
    if engine.tokenizer is None or not engine.tokenizer.chat_template:
        raise ValueError(f"{model} has no chat template")
    print("Chat with the model; an empty line or Ctrl-D ends it.", file=sys.stderr)
    messages: list[dict[str, str]] = []
    while True:
        try:
            user = input("you> ").strip()
        except EOFError:
            break
        if not user:
            break
        messages.append({"role": "user", "content": user})
        prompt = engine.tokenizer.apply_chat_template(messages)
        print("bot> ", end="", flush=True)
        out = engine.generate([prompt], params, on_output=lambda o: print(o.new_text, end="", flush=True))[0]
        print()
        messages.append({"role": "assistant", "content": out.text})
