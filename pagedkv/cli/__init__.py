"""The ``pagedkv`` command (also ``python -m pagedkv``): one module per group of subcommands.

- :mod:`pagedkv.cli.demo`: ``demo``, ``generate`` and ``chat`` (text generation);
- :mod:`pagedkv.cli.serve`: ``serve`` (the OpenAI-compatible HTTP server);
- :mod:`pagedkv.cli.sim`: ``sim run | sweep | calibrate`` (the workload simulator);
- :mod:`pagedkv.cli.check`: ``check`` (the invariants' state machines, ``pagedkv.testing``).

Building the parser imports no torch, so ``--help`` and the simulator answer at once;
each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pagedkv import __version__
from pagedkv.cli import check, demo, serve, sim
from pagedkv.errors import PagedKVError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedkv", description="A paged-KV LLM inference engine.")
    parser.add_argument("--version", action="version", version=f"pagedkv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo.add_commands(commands)
    serve.add_command(commands)
    sim.add_command(commands)
    check.add_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status (a command may return one: ``check``
    returns 1 when an invariant fails); a refused argument prints ``pagedkv: error: ...``
    and returns 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the library's progress notes, on stderr
    try:
        status = args.run(args)
    except (PagedKVError, ValueError, FileNotFoundError) as e:
        print(f"pagedkv: error: {e}", file=sys.stderr)
        return 2
    return status or 0
