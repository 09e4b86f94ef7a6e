"""``pagedkv serve``: the OpenAI-compatible HTTP server (needs the ``serve`` extra)."""

from __future__ import annotations

import argparse

from pagedkv.cli.demo import add_engine_flags, open_engine
from pagedkv.errors import PagedKVError


def add_command(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the [serve] extra)")
    add_engine_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="refuse new requests (503) beyond this many waiting")
    serve.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from pagedkv.server.api import build_app
        from pagedkv.server.async_engine import AsyncLLMEngine
    except ImportError as e:
        raise PagedKVError(f"pagedkv serve needs FastAPI and uvicorn: pip install -e '.[serve]' ({e})") from e
    engine = AsyncLLMEngine(open_engine(args), max_waiting=args.max_waiting)
    uvicorn.run(build_app(engine, args.model), host=args.host, port=args.port)
