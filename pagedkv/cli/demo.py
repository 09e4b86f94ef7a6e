"""The text-generation commands: ``pagedkv demo``, ``pagedkv generate`` and ``pagedkv chat``.

Their engine flags are :class:`EngineConfig`'s fields (see :mod:`pagedkv.cli.flags`);
torch and the model load only when a command runs.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pagedkv.cli.flags import add_model_flags, given_fields
from pagedkv.cli.live import LiveView
from pagedkv.scheduler import EngineConfig, EngineStats, LLMEngine, SamplingParams

if TYPE_CHECKING:
    from pagedkv.models.runner import ModelRunner

DEFAULT_MODEL = "smollm2-135m"
MODEL_HELP = "smollm2-135m, tiny, gpt2-small, or a path to a Llama-architecture .gguf file"

DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for writing clean Python code.",
    "What is a prime number? Give two examples.",
    "Write a short, friendly email inviting a colleague to lunch on Friday.",
]


def add_commands(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="several real prompts generated together, streaming, with a summary")
    add_engine_flags(demo)
    demo.add_argument("--max-tokens", type=int, default=96)
    demo.set_defaults(run=run_demo)

    generate = commands.add_parser("generate", help="generate from text prompts, streaming to the terminal")
    add_engine_flags(generate)
    _sampling_flags(generate, max_tokens=128)
    generate.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    generate.add_argument("prompts", nargs="+", metavar="PROMPT")
    generate.set_defaults(run=run_generate)

    chat = commands.add_parser("chat", help="a short interactive chat")
    add_engine_flags(chat)
    _sampling_flags(chat, max_tokens=256)
    chat.set_defaults(run=run_chat)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype`` and a flag for each :class:`EngineConfig` field."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default: {DEFAULT_MODEL})")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights and K/V (default: float32 on the CPU, bfloat16 on CUDA)")
    add_model_flags(parser, EngineConfig, "engine (EngineConfig)")


def _sampling_flags(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """Greedy by default at the terminal (SamplingParams' own default is vLLM's temperature 1)."""
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("-n", type=int, default=1, help="samples per prompt (sample i is seeded seed + i)")


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.sampling_seed, n=args.n)


def summary(engine: LLMEngine, num_requests: int, generated: int, seconds: float) -> str:
    stats: EngineStats = engine.stats()
    kib = engine.cache_layout.block_bytes / 1024
    return (
        f"{num_requests} requests, {generated} tokens in {seconds:.2f} s: {generated / seconds:.1f} tok/s; "
        f"KV pages used: peak {stats.kv_blocks_peak} of {stats.kv_blocks_total} "
        f"({engine.config.block_size} tokens, {kib:.0f} KiB each), {stats.num_preemptions} preemptions"
    )


def run_batch(engine: LLMEngine, prompts: Sequence[str | list[int]], params: SamplingParams, labels: list[str]) -> None:
    """Generate ``prompts`` together, streaming into a live view, then print the summary."""
    ids = [f"demo-{i}" for i in range(len(prompts))]
    view = LiveView(dict(zip(ids, labels, strict=True)))
    start = time.perf_counter()
    outputs = engine.generate(list(prompts), params, on_output=lambda o: view(o), request_ids=ids)
    view.finish()
    generated = sum(len(o.output_token_ids) for o in outputs)
    print(summary(engine, len(prompts), generated, time.perf_counter() - start))


def open_engine(args: argparse.Namespace) -> LLMEngine:
    """The engine the command's ``--model``, ``--dtype`` and engine flags ask for, with a note on stderr."""
    import torch

    from pagedkv.loader import load_engine  # imports torch: only when a command runs

    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    config = given_fields(args, EngineConfig)
    engine = load_engine(args.model, **({"dtype": args.dtype} if args.dtype else {}), **config)
    runner = _runner(engine)
    params = sum(p.numel() for p in runner.model.parameters()) / 1e6
    print(
        f"{args.model}: {params:.0f}M parameters, {runner.model.dtype}, {runner.device}, {torch.get_num_threads()} "
        f"threads, loaded in {time.perf_counter() - start:.1f} s; KV pool {engine.kv_manager.num_blocks} blocks "
        f"of {engine.config.block_size} tokens",
        file=sys.stderr,
    )
    return engine


def _runner(engine: LLMEngine) -> ModelRunner:
    """The engine's model runner: the commands' engines run a real model, never a simulation."""
    from pagedkv.models.runner import ModelRunner

    if not isinstance(engine.executor, ModelRunner):
        raise TypeError(f"the command needs a model runner, got {type(engine.executor).__name__}")
    return engine.executor


def run_demo(args: argparse.Namespace) -> None:
    engine = open_engine(args)
    seed = engine.config.seed
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    prompts: Sequence[str | list[int]]
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


def run_generate(args: argparse.Namespace) -> None:
    params = _sampling_params(args)  # refuse bad sampling flags before loading the model
    engine = open_engine(args)
    if engine.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; use smollm2-135m or a .gguf file for text")
    tokenizer = engine.tokenizer
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p for p in args.prompts]
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


def run_chat(args: argparse.Namespace) -> None:
    """A short interactive chat: each turn re-sends the conversation through the template."""
    params = _sampling_params(args)
    engine = open_engine(args)
    tokenizer = engine.tokenizer
    if tokenizer is None or not tokenizer.chat_template:
        raise ValueError(f"{args.model} has no chat template")
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
        prompt = tokenizer.apply_chat_template(messages)
        print("bot> ", end="", flush=True)
        out = engine.generate([prompt], params, on_output=lambda o: print(o.new_text, end="", flush=True))[0]
        print()
        messages.append({"role": "assistant", "content": out.text})
