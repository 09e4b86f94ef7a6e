"""The server in a background thread of this process, on a free port of 127.0.0.1: for
tests, notebooks and load scripts that want a real HTTP endpoint without a subprocess.

:func:`uvicorn_config` holds the connection settings ``pagedkv serve`` uses too, so that the
server tested here is configured as the one deployed."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from pagedkv.scheduler import LLMEngine
from pagedkv.server.api import DEFAULT_MAX_BODY_BYTES, LOOPBACK_HOSTS, build_app
from pagedkv.server.async_engine import AsyncLLMEngine

DEFAULT_KEEP_ALIVE_S = 5
"""An idle keep-alive connection is closed after this long, so idle clients cannot hold sockets."""
DEFAULT_MAX_CONNECTIONS = 512
"""Beyond this many open connections (or tasks) uvicorn answers 503 instead of taking more."""
MAX_HEADER_BYTES = 16 * 1024
"""h11's bound on an incomplete event: request line and headers larger than this are refused."""


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head: a connection must send a
    complete request line and headers within ``timeout_keep_alive`` seconds of opening, or of
    its previous response, or it is closed.

    uvicorn's own keep-alive timer starts only after a response, and any byte stops it, so a
    client that connects and sends nothing, or half a request line, would otherwise hold its
    socket, and a place under ``--max-connections``, for as long as it likes: enough such
    sockets and every other client gets a 503."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._finished_cycle: object | None = None  # the cycle whose response armed the deadline
        self._arm_head_deadline()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._finished_cycle:  # a new request head arrived in time
            self._disarm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete:
            self._finished_cycle = self.cycle
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.timeout_keep_alive, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(
    app: FastAPI,
    host: str,
    port: int,
    *,
    timeout_keep_alive: int = DEFAULT_KEEP_ALIVE_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    access_log: bool = False,
    log_level: str = "warning",
    shutdown_timeout_s: float | None = None,
) -> uvicorn.Config:
    """uvicorn's settings against idle and flooding clients: a short keep-alive, a cap on
    connections, a header size bound (h11, uvicorn's parser unless httptools is installed), and
    quiet logs (no access log: one line per request is a cost any client can make us pay).
    ``shutdown_timeout_s``: how long a shutdown waits for open requests before cancelling them
    (uvicorn waits for its connections before the app's own shutdown runs, so a stalled client
    would otherwise hold the server up for ever); None: wait."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=HeadTimeoutH11Protocol,  # h11 (whose header bound is set below), with a deadline per request head
        timeout_keep_alive=timeout_keep_alive,
        limit_concurrency=max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        access_log=access_log,
        log_level=log_level,
        server_header=False,
        timeout_graceful_shutdown=None if shutdown_timeout_s is None else max(1, round(shutdown_timeout_s)),
    )


class BackgroundServer:
    """uvicorn serving an engine in a background thread, on a free port of 127.0.0.1. It
    answers only to loopback Host names, as ``pagedkv serve`` does on loopback; the other
    keywords are :func:`~pagedkv.server.api.build_app`'s and :func:`uvicorn_config`'s."""

    def __init__(
        self,
        engine: LLMEngine,
        name: str,
        max_waiting: int = 256,
        *,
        allow_priority: bool = False,
        api_key: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        timeout_keep_alive: int = DEFAULT_KEEP_ALIVE_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.async_engine = AsyncLLMEngine(engine, max_waiting=max_waiting)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        app = build_app(self.async_engine, name, allow_priority=allow_priority, api_key=api_key,
                        allowed_hosts=LOOPBACK_HOSTS, max_body_bytes=max_body_bytes)
        self.config = uvicorn_config(app, "127.0.0.1", self.port, timeout_keep_alive=timeout_keep_alive,
                                     max_connections=max_connections)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        if self.thread.is_alive():
            raise RuntimeError("the server did not stop within 30 s")
