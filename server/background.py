"""The server in a background thread of this process, on a free port of 127.0.0.1: for
tests, notebooks and load scripts that want a real HTTP endpoint without a subprocess."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from pagedkv.scheduler import LLMEngine
from pagedkv.server.api import build_app
from pagedkv.server.async_engine import AsyncLLMEngine


class BackgroundServer:
    """uvicorn serving an engine in a background thread, on a free port of 127.0.0.1."""

    def __init__(self, engine: LLMEngine, name: str, max_waiting: int = 256) -> None:
        self.async_engine = AsyncLLMEngine(engine, max_waiting=max_waiting)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        app = build_app(self.async_engine, name)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
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
