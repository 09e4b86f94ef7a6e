"""Load on the OpenAI-compatible server: many concurrent streaming clients, some of which
hang up early, against a server in this process on 127.0.0.1. Checks that every client
that stayed got exactly the offline engine's greedy tokens and that, afterwards, nothing
is left running and the pool is whole; prints throughput and latency.

    python benchmarks/serve_load.py [--clients 256] [--model tiny|smollm2-135m] [--disconnect 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import httpx
import numpy as np

from pagedkv.loader import load_engine
from pagedkv.scheduler import SamplingParams
from pagedkv.server.background import BackgroundServer


async def client(http: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int, hang_up: bool):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    start, first, tokens = time.perf_counter(), None, []
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                tokens += [t for c in json.loads(line[6:])["choices"] for t in c["token_ids"]]
                first = first or time.perf_counter() - start
                if hang_up and len(tokens) >= 2:
                    return None, first
    return tokens, first


async def run(url: str, model: str, jobs) -> list:
    limits = httpx.Limits(max_connections=len(jobs))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        return await asyncio.gather(*(client(http, model, *job) for job in jobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--disconnect", type=float, default=0.3, help="share of clients that hang up early")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    engine = load_engine(args.model, block_size=16)
    vocab = engine.executor.vocab_size
    jobs = [([rng.randrange(1, vocab) for _ in range(rng.randint(4, 64))], rng.randint(8, 48),
             rng.random() < args.disconnect)
            for _ in range(args.clients)]
    reference = load_engine(args.model, block_size=16)
    wants = [o.output_token_ids for o in reference.generate(
        [p for p, _, _ in jobs], [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m, _ in jobs])]
    server = BackgroundServer(engine, args.model, max_waiting=args.clients)
    start = time.perf_counter()
    results = asyncio.run(run(server.url, args.model, jobs))
    seconds = time.perf_counter() - start
    stayed = [(got, want) for (got, _), want, (_, _, hang) in zip(results, wants, jobs, strict=True) if not hang]
    wrong = sum(got != want for got, want in stayed)
    deadline = time.monotonic() + 60
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    server.stop()
    stats = engine.stats()
    whole = not engine.has_unfinished_requests() and stats.kv_blocks_used == 0
    ttft = np.array([first for _, first in results if first is not None])
    tokens = sum(len(got) for got, _ in stayed)
    print(f"{args.clients} streaming clients ({len(jobs) - len(stayed)} hung up early, "
          f"{server.async_engine.num_cancelled} aborted by the server): {seconds:.1f} s, {tokens / seconds:.0f} tok/s "
          f"to the clients that stayed; TTFT p50 {np.percentile(ttft, 50):.2f} s, p99 {np.percentile(ttft, 99):.2f} s; "
          f"{len(stayed) - wrong}/{len(stayed)} equal the offline tokens; pool whole afterwards: {whole}")
    if wrong or not whole:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
