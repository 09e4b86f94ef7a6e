"""The validated public inputs' common base: pydantic models strict about types, whose
refusals are :class:`pagedkv.InvalidRequestError` naming the field."""

from __future__ import annotations

import reprlib
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, BeforeValidator, ByteSize, TypeAdapter, ValidationError

from pagedkv.errors import InvalidRequestError

_SHORT = reprlib.Repr()
"""Shows the refused value in a message without echoing all of it: a million stop ids
must not come back as megabytes of error text."""
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = _SHORT.maxfrozenset = _SHORT.maxdict = 20
_SHORT.maxstring = _SHORT.maxother = 200
_SHORT.maxlong = 100


def invalid_request(error: ValidationError) -> InvalidRequestError:
    """pydantic's error as ours: one line per refused field (its name, pydantic's message,
    the value given, shortened), with ``param`` naming the first field."""
    problems = error.errors(include_url=False)
    lines = []
    for p in problems:
        where = ".".join(str(part) for part in p["loc"]) or error.title
        message = str(p["ctx"]["error"]) if p["type"] == "value_error" else p["msg"]
        got = f" (got {_SHORT.repr(p['input'])})" if p["type"] != "missing" and p["loc"] else ""
        lines.append(f"{where}: {message}{got}")
    first = problems[0]["loc"] if problems else ()
    return InvalidRequestError("; ".join(lines), str(first[0]) if first else None)


_BYTE_SIZE: TypeAdapter[ByteSize] = TypeAdapter(ByteSize)


def _size_from_text(value: object) -> object:
    """``"256MiB"``, ``"2GiB"``, ``"1.5GB"`` -> bytes (pydantic's ``ByteSize`` units); any
    other value goes on unchanged to the strict integer check."""
    return int(_BYTE_SIZE.validate_python(value)) if isinstance(value, str) else value


MemorySize = Annotated[int, BeforeValidator(_size_from_text)]
"""A number of bytes, given as an integer or as text with a unit."""


class InputModel(BaseModel):
    """A validated public input (sampling parameters, engine and workload configs): a
    refused value raises :class:`pagedkv.InvalidRequestError` whose ``param`` names the
    field, with pydantic's ``ValidationError`` as its ``__cause__``, so that callers catch
    one error class at every boundary."""

    if not TYPE_CHECKING:  # type checkers keep the pydantic plugin's typed __init__

        def __init__(self, **data: Any) -> None:
            try:
                super().__init__(**data)
            except ValidationError as e:
                raise invalid_request(e) from e
