"""Hostile clients against the OpenAI-compatible server (issue 15's proof): does a server in
this process, on 127.0.0.1, keep serving its normal streaming clients while others attack it?

After a 3 s warm-up, a baseline phase runs only the normal clients (each loops: stream a completion of token-id
prompts, recording time to first chunk and the gaps between chunks). The attack phase runs the
same clients alongside, for a bounded time: stalled readers (raw sockets with a tiny receive
buffer that open n=4 streams and never read), bodies just over --max-body-bytes (with a
Content-Length and chunked, expecting 413), huge text prompts, idle sockets (nothing sent, or
half a request line), a priority flood (expecting 400: priority is off by default) and garbage
bodies. It prints each class's outcomes (status codes, or the exception a client got), the
normal clients' latencies in both phases, /health latency under attack, the RSS of this process
over time (the server runs in a thread here, so that RSS is the server's plus the clients'), and
whether the KV pool is whole once every request has finished. Exit status 1 if a 5xx was seen
or the pool is not whole.

    python benchmarks/hostile_clients.py [--model tiny|smollm2-135m] [--clients 50] [--attack-s 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import threading
import time
from collections import Counter, defaultdict

import httpx
import numpy as np
import psutil

from pagedkv.loader import load_engine
from pagedkv.server.api import DEFAULT_MAX_BODY_BYTES, MAX_PROMPT_CHARS_PER_TOKEN
from pagedkv.server.background import BackgroundServer


class Run:
    def __init__(self, url: str, model: str, vocab: int, max_len: int, args: argparse.Namespace) -> None:
        self.url, self.model, self.vocab, self.max_len, self.args = url, model, vocab, max_len, args
        self.outcomes: dict[str, Counter] = defaultdict(Counter)
        self.ttft: dict[str, list[float]] = defaultdict(list)
        self.gaps: dict[str, list[float]] = defaultdict(list)
        self.health: dict[str, list[float]] = defaultdict(list)
        self.rng = random.Random(args.seed)

    def prompt(self, n: int) -> list[int]:
        return [self.rng.randrange(1, self.vocab) for _ in range(n)]

    async def post(self, http: httpx.AsyncClient, kind: str, **kwargs) -> None:
        try:
            r = await http.post("/v1/completions", **kwargs)
            self.outcomes[kind][r.status_code] += 1
        except httpx.HTTPError as e:
            self.outcomes[kind][type(e).__name__] += 1

    async def normal(self, http: httpx.AsyncClient, phase: str, until: float) -> None:
        while time.monotonic() < until:
            body = {"model": self.model, "prompt": self.prompt(16), "max_tokens": self.args.tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True}
            start, status, done, last = time.perf_counter(), None, False, None
            try:
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    status = r.status_code
                    async for line in r.aiter_lines():
                        done |= line == "data: [DONE]"
                        if line.startswith("data: {"):
                            now = time.perf_counter()
                            (self.ttft[phase] if last is None else self.gaps[phase]).append(now - (last or start))
                            last = now
                outcome = status if done else f"{status} without [DONE]"
            except httpx.HTTPError as e:
                outcome = f"{type(e).__name__} {'before headers' if status is None else 'mid-stream'}"
            self.outcomes[f"normal ({phase})"][outcome] += 1

    async def prober(self, http: httpx.AsyncClient, phase: str, until: float) -> None:
        while time.monotonic() < until:
            start = time.perf_counter()
            try:
                r = await http.get("/health")
                self.outcomes[f"/health ({phase})"][r.status_code] += 1
                self.health[phase].append(time.perf_counter() - start)
            except httpx.HTTPError as e:
                self.outcomes[f"/health ({phase})"][type(e).__name__] += 1
            await asyncio.sleep(0.1)

    async def raw(self, request: bytes, hold_until: float, rcvbuf: int | None = None) -> str:
        """Open a socket, send ``request`` and read nothing until ``hold_until``; then the
        status code the server sent, or how the connection ended."""
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", int(self.url.rsplit(":", 1)[1])))
            reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
        except OSError as e:
            sock.close()
            return type(e).__name__
        try:
            writer.write(request)
            await writer.drain()
            await asyncio.sleep(max(0.0, hold_until - time.monotonic()))
            head = await asyncio.wait_for(reader.read(12), timeout=2)
            return head[9:12].decode() if head.startswith(b"HTTP/1.1 ") else "closed by server" if not head else "?"
        except TimeoutError:
            return "still open, no answer"
        except OSError as e:
            return type(e).__name__
        finally:
            writer.close()

    def http_request(self, body: dict) -> bytes:
        data = json.dumps(body).encode()
        return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(data)) + data

    async def stalled(self, until: float) -> None:
        p = self.prompt(8)
        body = {"model": self.model, "prompt": p, "max_tokens": min(512, self.max_len - len(p)), "n": 4,
                "temperature": 1.0, "ignore_eos": True, "stream": True}
        self.outcomes["stalled reader"][await self.raw(self.http_request(body), until, rcvbuf=4096)] += 1

    async def idle(self, i: int, until: float) -> None:
        request = b"" if i % 2 == 0 else b"POST /v1/compl"
        self.outcomes["idle socket" if i % 2 == 0 else "half request line"][await self.raw(request, until)] += 1

    async def big_bodies(self, http: httpx.AsyncClient, until: float) -> None:
        limit = self.args.max_body_bytes
        pad = "x" * (limit - len(json.dumps({"model": self.model, "prompt": ""})) + 1)
        body = json.dumps({"model": self.model, "prompt": pad}).encode()  # limit + 1 bytes
        assert len(body) == limit + 1

        async def chunked():
            for i in range(0, len(body), 1 << 16):
                yield body[i:i + (1 << 16)]

        for _ in range(self.args.repeats):
            if time.monotonic() > until:
                break
            await self.post(http, "body > limit (Content-Length)", content=body,
                            headers={"content-type": "application/json"})
            await self.post(http, "body > limit (chunked)", content=chunked(),
                            headers={"content-type": "application/json"})
            cap = self.max_len * MAX_PROMPT_CHARS_PER_TOKEN  # characters: the server's bound before tokenizing
            await self.post(http, "text prompt at the cap", json={"model": self.model, "prompt": "a " * (cap // 2)})
            await self.post(http, "text prompt over the cap", json={"model": self.model, "prompt": "a" * (cap + 1)})

    async def flood(self, http: httpx.AsyncClient, until: float) -> None:
        for _ in range(self.args.repeats * 10):
            if time.monotonic() > until:
                break
            await self.post(http, "priority -2**31", json={"model": self.model, "prompt": [1, 2, 3], "max_tokens": 8,
                                                           "priority": -2**31})

    async def garbage(self, http: httpx.AsyncClient, until: float) -> None:
        m, dumps = self.model, json.dumps
        bodies = {"truncated JSON": b"{", "invalid UTF-8": b"\xff\xfe", "JSON array": b"[]", "JSON null": b"null",
                  "two JSON objects": dumps({"model": m, "prompt": "x"}).encode() * 2,
                  "wrong types": dumps({"model": m, "prompt": [1.5, True], "max_tokens": "8"}).encode(),
                  "unknown fields": dumps({"model": m, "prompt": [1], "max_tokens": 4, "frob": [1] * 1000}).encode(),
                  "lone surrogate prompt": b'{"model": "%s", "prompt": "\\ud800", "max_tokens": 4}' % m.encode(),
                  "lone surrogate model": b'{"model": "\\ud800", "prompt": [1], "max_tokens": 4}',
                  "200k stop_token_ids": dumps({"model": m, "prompt": [1], "max_tokens": 4,
                                                "stop_token_ids": list(range(200_000))}).encode(),
                  "out-of-range numbers": dumps({"model": m, "prompt": [1], "max_tokens": 2**63, "n": -1}).encode(),
                  "token ids out of vocab": dumps({"model": m, "prompt": [self.vocab + 7, -1]}).encode()}
        for _ in range(self.args.repeats):
            for name, body in bodies.items():
                if time.monotonic() > until:
                    break
                await self.post(http, f"garbage: {name}", content=body, headers={"content-type": "application/json"})

    async def phase(self, name: str, seconds: float, attack: bool) -> None:
        until = time.monotonic() + seconds
        # Pooled connections expire before the server's 5 s keep-alive, so none is reused as the server closes it.
        limits = httpx.Limits(max_connections=self.args.clients + 16, keepalive_expiry=2)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as http, \
                httpx.AsyncClient(base_url=self.url, timeout=60) as other:
            tasks = [self.normal(http, name, until) for _ in range(self.args.clients)]
            tasks.append(self.prober(other, name, until))
            if attack:
                tasks += [self.stalled(until) for _ in range(self.args.stalled)]
                tasks += [self.idle(i, until) for i in range(self.args.idle)]
                tasks += [self.big_bodies(other, until), self.flood(other, until), self.garbage(other, until)]
            await asyncio.gather(*tasks)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1000 if xs else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--clients", type=int, default=50, help="normal streaming clients")
    parser.add_argument("--tokens", type=int, default=32, help="tokens each normal completion streams")
    parser.add_argument("--stalled", type=int, default=4)
    parser.add_argument("--idle", type=int, default=200, help="idle sockets (half send half a request line)")
    parser.add_argument("--repeats", type=int, default=20, help="bounds each attacker's request count")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--baseline-s", type=float, default=15)
    parser.add_argument("--attack-s", type=float, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    engine = load_engine(args.model, block_size=16)
    server = BackgroundServer(engine, args.model, max_waiting=4 * args.clients, max_body_bytes=args.max_body_bytes)
    run = Run(server.url, args.model, engine.executor.vocab_size, engine.max_model_len, args)
    rss: list[tuple[float, float]] = []
    sampling, t0 = threading.Event(), time.monotonic()

    def sample() -> None:
        me = psutil.Process()
        while not sampling.wait(0.5):
            rss.append((time.monotonic() - t0, me.memory_info().rss / 2**20))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    asyncio.run(run.phase("warm-up", 3, attack=False))  # first calls into torch are slow: not measured
    asyncio.run(run.phase("baseline", args.baseline_s, attack=False))
    attack_start = time.monotonic() - t0
    asyncio.run(run.phase("attack", args.attack_s, attack=True))
    attack_end = time.monotonic() - t0
    deadline = time.monotonic() + 60
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    drained = not engine.has_unfinished_requests()
    server.stop()
    sampling.set()
    sampler.join()
    engine.kv_manager.check()  # raises if an invariant is broken
    kv = engine.kv_manager
    whole = drained and kv.num_free_blocks == kv.num_blocks

    print(f"model {args.model}, {args.clients} normal clients x {args.tokens} tokens; "
          f"baseline {args.baseline_s:.0f} s, attack {args.attack_s:.0f} s (server on {server.url}, in this process)\n")
    print(f"{'class':32} outcomes (status code or client-side exception: count)")
    for kind, counts in sorted(run.outcomes.items(), key=lambda kv: (not kv[0].startswith(("normal", "/h")), kv[0])):
        print(f"{kind:32} " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=str)))
    print(f"\n{'normal clients (ms)':32} {'baseline':>10} {'attack':>10} {'ratio':>7}")
    for label, data, q in [("TTFT p50", run.ttft, 50), ("TTFT p99", run.ttft, 99), ("inter-chunk p99", run.gaps, 99)]:
        b, a = pct(data["baseline"], q), pct(data["attack"], q)
        print(f"{label:32} {b:10.1f} {a:10.1f} {a / b:7.2f}")
    print(f"{'/health p99':32} {pct(run.health['baseline'], 99):10.1f} {pct(run.health['attack'], 99):10.1f}")
    print(f"{'completions streamed':32} {len(run.ttft['baseline']):10} {len(run.ttft['attack']):10}")
    print(f"\nRSS of this process (server + clients), MiB; attack from {attack_start:.0f} s to {attack_end:.0f} s:")
    step = max(1, len(rss) // 12)
    print("  " + "  ".join(f"{t:.0f}s:{m:.0f}" for t, m in rss[::step]) + f"  (peak {max(m for _, m in rss):.0f})")
    print(f"\nKV pool after all requests finished: check() passed, {kv.num_free_blocks}/{kv.num_blocks} blocks free, "
          f"requests left: {not drained} -> {'whole' if whole else 'NOT WHOLE'}")
    errors = sum(v for counts in run.outcomes.values() for k, v in counts.items() if isinstance(k, int) and k >= 500)
    if errors or not whole:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
