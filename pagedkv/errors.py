"""Every error pagedkv raises on purpose, under one base class.

``InvalidRequestError`` is also a ``ValueError`` (code that caught that keeps working) and
carries ``param``, the input field it refuses, so that the HTTP server can report the
field without parsing the message. The others say why a request that was valid did not
complete. This module imports nothing, so every layer may raise these.
"""

from __future__ import annotations


class PagedKVError(Exception):
    """The base of every error pagedkv raises on purpose."""


class InvalidRequestError(PagedKVError, ValueError):
    """An input was refused at the boundary; nothing in the engine changed.

    ``param`` names the offending field (``"temperature"``, ``"prompt"``, ...), or is
    ``None`` when the input as a whole is wrong.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineBusyError(PagedKVError):
    """Too many requests are in flight (or the engine is not idle); this one was refused
    and nothing else changed. Try again later."""


class EngineDeadError(PagedKVError):
    """The engine's background loop has stopped (shut down, or an unexpected error)."""


class RequestFailedError(PagedKVError):
    """The engine failed this request (its step raised, or its logits were not finite);
    the other requests go on."""
