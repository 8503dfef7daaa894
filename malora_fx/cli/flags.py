"""Command-line flags built from the config dataclasses: one source of truth.

A frozen config dataclass (``MALoRAConfig``, ``TrainArgs``) documents each
field in its docstring's ``Attributes:`` section. :func:`add_dataclass_flags`
turns every field into a flag whose type, default and help come from the
field itself (``top_k`` → ``--top-k``, ``bool`` → a switch; a field's
``metadata={"flag": "--experts"}`` spells its flag otherwise), so a
new config field is one edit: the field and its line in the docstring.
:func:`dataclass_from_args` builds the config back from the parsed flags, and
the config's own validation gives the error messages.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any, TypeVar

EXIT_USAGE = 2
T = TypeVar("T")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit with status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def field_docs(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Attributes:`` section of ``cls``'s docstring
    (Google style: ``name: text`` with indented continuation lines)."""
    doc = cls.__doc__ or ""
    _, found, section = doc.partition("Attributes:")
    if not found:
        return {}
    docs: dict[str, str] = {}
    current = None
    indent = None
    for line in section.splitlines()[1:]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        match = re.match(r"(\w+): (.*)", line.strip())
        if width == indent and match:
            current = match.group(1)
            docs[current] = match.group(2)
        elif current is not None:
            docs[current] += " " + line.strip()
    return {name: " ".join(text.replace("``", "").split()) for name, text in docs.items()}


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _scalar_type(hint: Any) -> Any:
    """``int`` for ``int`` / ``int | None`` (likewise float, str); ``str`` otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if len(args) == 1 else hint
    return base if base in (int, float, str, bool) else str


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of dataclass ``cls`` (except ``skip``) to ``parser``."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        name = field.metadata.get("flag") or flag_name(field.name)
        help_text = docs.get(field.name, "").rstrip(".")
        kind = _scalar_type(hints[field.name])
        if kind is bool:
            parser.add_argument(name, dest=field.name, action="store_true", help=help_text)
            continue
        if field.default not in (None, dataclasses.MISSING):
            help_text += f" (default: {field.default})"
        parser.add_argument(
            name, dest=field.name, type=kind, default=field.default, help=help_text, metavar=field.name.upper()
        )


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """An instance of dataclass ``cls`` from the flags :func:`add_dataclass_flags` added."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if hasattr(args, f.name)
    }
    return cls(**values)
