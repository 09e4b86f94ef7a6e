"""``pagedkv serve``: the OpenAI-compatible HTTP server (needs the ``serve`` extra).

Defaults are for a server some client may abuse: priorities are ignored unless allowed, an API
key may be required (flag or ``PAGEDKV_API_KEY``), on loopback only loopback Host names are
answered (DNS rebinding), bodies and connections are bounded, and the model's id never shows a
file path of this machine."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pagedkv.cli.demo import add_engine_flags, open_engine
from pagedkv.errors import PagedKVError

if TYPE_CHECKING:
    import uvicorn

    from pagedkv.server.async_engine import AsyncLLMEngine

API_KEY_ENV = "PAGEDKV_API_KEY"


def add_command(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the [serve] extra)")
    add_engine_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="refuse new requests (503) beyond this many waiting")
    serve.add_argument("--served-model-name", default=None,
                       help="the model id clients send and see (default: --model; a file path serves as its stem)")
    serve.add_argument("--api-key", default=None,
                       help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set; "
                            "the variable keeps the key out of the process list)")
    serve.add_argument("--allow-priority", action="store_true",
                       help="honour the requests' priority field (otherwise a nonzero priority is a 400)")
    serve.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024,
                       help="refuse request bodies larger than this (413; default 8 MiB)")
    serve.add_argument("--max-connections", type=int, default=512,
                       help="answer 503 beyond this many open connections (default 512)")
    serve.add_argument("--timeout-keep-alive", type=int, default=5,
                       help="close an idle keep-alive connection after this many seconds (default 5)")
    serve.add_argument("--shutdown-timeout", type=float, default=5.0,
                       help="on shutdown, seconds requests in flight may take to finish before they are aborted "
                            "(default 5)")
    serve.add_argument("--access-log", action="store_true", help="log every request (default: warnings only)")
    serve.set_defaults(run=run)


def served_model_name(model: str, override: str | None = None) -> str:
    """The model id served: ``override`` if given, else ``model``, except that a file path
    serves as its stem (``/data/models/llama-3.gguf`` -> ``llama-3``), so that clients listing
    the models do not learn this machine's directory layout."""
    if override:
        return override
    if model.endswith(".gguf") or "/" in model or os.sep in model:
        return Path(model).stem
    return model


def is_loopback(host: str) -> bool:
    """Whether ``host`` (the bind address) is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_config(args: argparse.Namespace, engine: AsyncLLMEngine) -> uvicorn.Config:
    """The uvicorn configuration for the flags: the app with its guards, and the connection
    limits of :func:`~pagedkv.server.background.uvicorn_config`."""
    from pagedkv.server.api import LOOPBACK_HOSTS, build_app
    from pagedkv.server.background import uvicorn_config

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = build_app(engine, served_model_name(args.model, args.served_model_name),
                    allow_priority=args.allow_priority, api_key=api_key,
                    allowed_hosts=LOOPBACK_HOSTS if is_loopback(args.host) else None,
                    max_body_bytes=args.max_body_bytes, shutdown_timeout_s=args.shutdown_timeout)
    return uvicorn_config(app, args.host, args.port, timeout_keep_alive=args.timeout_keep_alive,
                          max_connections=args.max_connections, access_log=args.access_log,
                          shutdown_timeout_s=args.shutdown_timeout)


def run(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from pagedkv.server.async_engine import AsyncLLMEngine
    except ImportError as e:
        raise PagedKVError(f"pagedkv serve needs FastAPI and uvicorn: pip install -e '.[serve]' ({e})") from e
    engine = AsyncLLMEngine(open_engine(args), max_waiting=args.max_waiting)
    uvicorn.Server(server_config(args, engine)).run()
