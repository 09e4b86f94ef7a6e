"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, for every
failure the server answers: bad bodies (400, ``param`` naming the field), 404/405, and the
schema of those responses in ``/openapi.json``."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str = Field(description="invalid_request_error, not_found_error or server_error")
    param: str | None = Field(description="the request field at fault (messages.0.role), or null")
    code: str | None


class ErrorBody(BaseModel):
    """The body of every error response, in OpenAI's shape: ``{"error": {...}}``."""

    error: ErrorDetail


_ERROR_WHEN = {
    400: "An invalid request: a body that is not valid JSON or not an object, a bad value or a field this server "
         "does not support (named by param), an unknown model, or a prompt too long",
    401: "No valid API key (only on a server started with one)",
    413: "A request body larger than the server's limit",
    421: "A Host header this server does not answer to (only on a server with a Host allow-list)",
    500: "The engine failed the request",
    503: "Too many requests wait, or the engine has stopped",
}


def error_responses(*statuses: int, v1: bool, api_key: str | None,
               allowed_hosts: Collection[str] | None) -> dict[int | str, dict[str, Any]]:
    """A route's error responses for the OpenAPI schema (``responses=``), each with :class:`ErrorBody`:
    ``statuses``, those of :class:`Gate` that apply (413; 401 on ``/v1/*`` with an API key; 421 with a
    Host allow-list), and ``default`` for any other. A ``default`` also keeps FastAPI from advertising its
    422, which this server never returns (:func:`validation_error` makes them 400s)."""
    codes = {*statuses, 413}
    if v1 and api_key:
        codes.add(401)
    if allowed_hosts is not None:
        codes.add(421)
    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody, "description": _ERROR_WHEN[code]} for code in sorted(codes)}
    responses["default"] = {"model": ErrorBody, "description": "Any other error, in the same shape"}
    return responses


_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}
_MAX_ERRORS_TOLD = 10


def _param(loc: Sequence[Any], body: Any, missing: bool) -> str | None:
    """The dotted path of the field an error is about (``messages.0.role``), or None for the body
    itself: ``loc`` without its leading ``"body"`` and without the names pydantic gives the members
    of a union (``prompt.str``, ``prompt.list[int]``) or to dict keys (``[key]``), which are told
    apart from the client's own keys by walking the body: it has no such key there. The last part of
    a ``missing`` error is the required field not given."""
    parts: list[str] = []
    value = body
    for i, part in enumerate(loc[1:], start=1):
        if isinstance(value, dict) and isinstance(part, str) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        elif not (missing and i == len(loc) - 1):
            continue
        parts.append(str(part))
    return ".".join(parts) or None


def _whole_body_problem(kind: str, body: Any) -> str:
    """What is wrong with a body refused as a whole (empty, or not a JSON object)."""
    if kind == "missing":
        return "the request body is empty; it must be a JSON object"
    if isinstance(body, bytes | bytearray):  # FastAPI parses JSON only when the Content-Type says so
        return "the request body must be a JSON object, sent with Content-Type: application/json"
    return f"the request body must be a JSON object, not {_JSON_KINDS.get(type(body), 'that')}"


def validation_error(e: RequestValidationError) -> JSONResponse:
    """A refused body as a 400 naming the first field at fault (never a 422). A field we do not
    declare (pydantic's ``extra_forbidden``) comes first and is said to be "not supported", so that
    the client learns the server cannot honour it, not that its value is malformed. A body that is
    not valid JSON, empty or not an object is refused as a whole, with ``param`` null (FastAPI's
    ``json_invalid`` error puts a character offset where the field would be)."""
    errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")  # stable: the rest keep their order
    first = errors[0]
    if first["type"] == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        offset = first["loc"][-1] if len(first["loc"]) > 1 else None
        where = f" (at character {offset})" if isinstance(offset, int) else ""
        return error_response(400, "the request body is not valid JSON" + (f": {reason}" if reason else "") + where)
    if len(first["loc"]) <= 1:
        return error_response(400, _whole_body_problem(first["type"], e.body))

    def why(err: Any) -> str:
        return "not supported by this server" if err["type"] == "extra_forbidden" else str(err["msg"])

    params = [_param(err["loc"], e.body, err["type"] == "missing") for err in errors]
    def named(param: str | None, err: Any) -> str:
        if param is None and err["type"] == "extra_forbidden":
            return "'' (an empty field name)"  # the body's own key "", not the body
        return param or "body"

    told = [f"{named(param, err)}: {why(err)}" for param, err in zip(params, errors, strict=True)][:_MAX_ERRORS_TOLD]
    if len(errors) > _MAX_ERRORS_TOLD:
        told.append(f"and {len(errors) - _MAX_ERRORS_TOLD} more")
    return error_response(400, "; ".join(told), params[0])


def http_error_response(request: Request, e: StarletteHTTPException) -> Response:
    """Starlette's and FastAPI's HTTP errors (404 for an unknown path, 405 for a wrong method, 400
    for a body that cannot be decoded) in OpenAI's shape, keeping their headers (``Allow``)."""
    headers = dict(e.headers or {})
    if e.status_code in (204, 304):  # no body allowed
        return Response(status_code=e.status_code, headers=headers)
    kind = "invalid_request_error"
    if e.status_code == 404:
        message, kind = f"Invalid URL ({request.method} {request.url.path}): this server has no such path", \
            "not_found_error"
    elif e.status_code == 405:
        allowed = headers.get("allow") or headers.get("Allow")
        message = f"{request.method} is not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
    elif e.status_code == 400 and e.detail == "There was an error parsing the body":
        message = "the request body is not valid JSON (it cannot be decoded)"
    else:
        message = str(e.detail)
        if e.status_code >= 500:
            kind = "server_error"
    response = error_response(e.status_code, message, kind=kind)
    response.headers.update(headers)
    return response
