"""The ``pagedkv`` command line."""

from __future__ import annotations

import argparse
import sys

from models.config import GPT_PRESETS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedkv", description="A paged-KV LLM inference engine.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="generate several requests together through the paged cache")
    demo.add_argument("--preset", choices=sorted(GPT_PRESETS), default="gpt2-small", help="model shape (random weights)")
    demo.add_argument("--num-requests", type=int, default=8)
    demo.add_argument("--max-tokens", type=int, default=64, help="longest request's new tokens")
    demo.add_argument("--block-size", type=int, default=16)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from sim.demo import run_demo

        run_demo(args.preset, args.num_requests, args.max_tokens, args.block_size, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
