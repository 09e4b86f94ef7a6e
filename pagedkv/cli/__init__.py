"""The ``pagedkv`` command line."""

from __future__ import annotations

import argparse
import sys

from pagedkv.loader import MODEL_NAMES
from pagedkv.cli import sim as sim_cli

DEFAULT_MODEL = "smollm2-135m"


def _sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("-n", type=int, default=1, help="samples per prompt (sample i is seeded seed + i)")


def _engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"{', '.join(MODEL_NAMES)}, or a .gguf path")
    parser.add_argument("--block-size", type=int, default=16)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedkv", description="A paged-KV LLM inference engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="several real prompts generated together, streaming, with a summary")
    _engine_args(demo)
    demo.add_argument("--max-tokens", type=int, default=96)
    demo.add_argument("--seed", type=int, default=0)

    generate = commands.add_parser("generate", help="generate from text prompts, streaming to the terminal")
    _engine_args(generate)
    _sampling_args(generate, max_tokens=128)
    generate.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    generate.add_argument("prompts", nargs="+", metavar="PROMPT")

    chat = commands.add_parser("chat", help="a short interactive chat")
    _engine_args(chat)
    _sampling_args(chat, max_tokens=256)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the [serve] extra)")
    _engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-waiting", type=int, default=256, help="refuse new requests (503) beyond this many waiting")

    sim = commands.add_parser("sim", help="the workload simulator: run, sweep, calibrate")
    sim_cli.add_arguments(sim)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from pagedkv.scheduler import SamplingParams
    from pagedkv.cli import demo

    try:
        if args.command == "sim":
            sim_cli.main(args)
            return 0
        if args.command == "serve":
            serve(args)
            return 0
        if args.command == "demo":
            demo.run_demo(args.model, args.max_tokens, args.block_size, args.seed)
            return 0
        params = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed,
            n=args.n,
        )
        if args.command == "generate":
            demo.run_generate(args.model, args.prompts, params, args.chat, args.block_size, seed=0)
        elif args.command == "chat":
            demo.run_chat(args.model, params, args.block_size, seed=0)
    except (ValidationError, ValueError, FileNotFoundError) as e:
        print(f"pagedkv: error: {e}", file=sys.stderr)
        return 2
    return 0


def serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from pagedkv.server.api import build_app
        from pagedkv.server.async_engine import AsyncLLMEngine
    except ImportError as e:
        raise ValueError(f"pagedkv serve needs FastAPI and uvicorn: pip install -e '.[serve]' ({e})") from e
    from pagedkv.cli.demo import open_engine

    engine = AsyncLLMEngine(open_engine(args.model, args.block_size, seed=0), max_waiting=args.max_waiting)
    uvicorn.run(build_app(engine, args.model), host=args.host, port=args.port)


if __name__ == "__main__":
    sys.exit(main())
