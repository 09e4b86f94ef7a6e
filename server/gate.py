"""The gate every request passes before the app reads its body: a Host allow-list against
DNS rebinding (421), the API key on ``/v1/*`` (401), and the body size limit (413)."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Collection

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedkv.server.errors import error_response

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
"""The largest request body accepted (413 beyond): generous for any prompt max_model_len allows."""
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
"""The Host names a server bound to loopback answers to: a DNS-rebinding page sends its own."""


class BodyTooLarge(Exception):
    """Raised from the receive channel of a request whose body outgrows the limit."""


def _host_name(host: str) -> str:
    """The name part of a Host header, lowercased: ``[::1]:8000`` -> ``[::1]``, ``localhost:80`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Gate:
    """Pure ASGI middleware that refuses a request before the app reads its body (so before
    FastAPI buffers and parses it): a Host not in ``allowed_hosts`` (421), a missing or wrong
    API key on ``/v1/*`` (401; ``/health`` and ``/metrics`` stay open for probes), a body over
    ``max_body_bytes`` (413, from Content-Length, or counted as a chunked body streams in)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, allowed_hosts: Collection[str] | None,
                 max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        limit, received, too_large, started = self.max_body_bytes, 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large:
                return  # whatever the app made of the aborted read is replaced by the 413
            started = True
            await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, counted_receive, guarded_send)
        if too_large and not started:
            await self._too_large()(scope, receive, send)

    def _refusal(self, path: str, headers: Headers) -> JSONResponse | None:
        if self.allowed_hosts is not None and _host_name(headers.get("host", "")) not in self.allowed_hosts:
            return error_response(421, f"this server does not answer to Host {headers.get('host', '')!r}")
        if self.api_key is not None and (path == "/v1" or path.startswith("/v1/")):
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key):
                return error_response(401, "a valid API key is needed: send the header 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_body_bytes):
            return self._too_large()
        return None

    def _too_large(self) -> JSONResponse:
        # No "Connection: close": closing while the client still uploads resets the connection
        # before it reads the 413. uvicorn discards the rest of the body instead, for at most
        # the head deadline of HeadTimeoutH11Protocol (armed when this response completes).
        limit = self.max_body_bytes
        return error_response(413, f"the request body is larger than this server's limit of {limit} bytes")
