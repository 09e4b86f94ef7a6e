"""Command-line flags generated from pydantic models, so that a flag and its field agree.

Each field ``max_num_seqs`` becomes ``--max-num-seqs`` (a bool becomes the pair
``--enable-prefix-caching`` / ``--no-enable-prefix-caching``, vLLM's spelling), with the
field's type, choices, description and default in its help. The flags default to
*absent* (``argparse.SUPPRESS``): only what the user typed reaches the model, so the
model's own defaults apply and no default is written twice.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Collection, Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

Parser = Callable[[str], Any]


def add_model_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    title: str,
    include: Collection[str] | None = None,
    exclude: Collection[str] = (),
    parsers: Mapping[type, Parser] | None = None,
) -> None:
    """Add a flag for each field of ``model`` (those in ``include``, less ``exclude``) to a
    group of ``parser``. ``parsers`` turn text into field types argparse cannot build."""
    group = parser.add_argument_group(title)
    for name, field in model.model_fields.items():
        if (include is not None and name not in include) or name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        kind, choices = _flag_type(field, parsers or {})
        help_text = _help(field, text_parsed=kind is str and field.annotation is not str)
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            metavar = None if choices else name.upper()
            group.add_argument(flag, type=kind, choices=choices, default=argparse.SUPPRESS, metavar=metavar,
                               help=help_text)


def given_fields(args: argparse.Namespace, model: type[BaseModel], exclude: Collection[str] = ()) -> dict[str, Any]:
    """The fields of ``model`` (less ``exclude``) that the user gave on the command line."""
    return {name: value for name, value in vars(args).items() if name in model.model_fields and name not in exclude}


def _flag_type(field: FieldInfo, parsers: Mapping[type, Parser]) -> tuple[Parser, list[Any] | None]:
    """How argparse reads the field: a callable from text, and the allowed choices."""
    annotation = _strip_optional(field.annotation)
    metadata = [*field.metadata, *(get_args(annotation)[1:] if get_origin(annotation) is Annotated else ())]
    if any(isinstance(m, BeforeValidator) for m in metadata):
        return str, None  # the field parses text itself (e.g. "256MiB")
    if get_origin(annotation) is Literal:
        choices = list(get_args(annotation))
        return type(choices[0]), choices
    if annotation in parsers:
        return parsers[annotation], None
    if annotation in (bool, int, float, str) or isinstance(annotation, type):
        return annotation, None
    raise TypeError(f"no command-line type for field type {annotation!r}")


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _help(field: FieldInfo, text_parsed: bool) -> str:
    """The field's description as one line, with its default unless the description gives it."""
    text = " ".join((field.description or "").split()).replace("``", "")
    if "default" in text.lower():
        return text
    default = field.get_default(call_default_factory=True)
    if default is None:
        shown = "none"
    elif isinstance(default, bool):
        shown = "on" if default else "off"
    elif text_parsed and isinstance(default, int) and default % 2**20 == 0:  # a memory size, in its units
        shown = f"{default // 2**20}MiB"
    else:
        shown = str(default)
    return f"{text} (default: {shown})"
