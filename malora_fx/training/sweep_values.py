"""One-line checks of the values in a sweep spec, for :mod:`.sweep_spec`.

Each takes the spec's ``source`` (its file name) and the dotted key it checks, and raises a
:class:`MaloraError` naming the key, the value and what is allowed (``spec.toml: lrs[1]: -1 is not
allowed; expected a number > 0``); the ones that accept return the value as the spec keeps it.
"""

from __future__ import annotations

from typing import Any

from ..errors import MaloraError


def check_types(source: str, where: str, data: dict[str, Any], types: dict[str, type]) -> None:
    """Each value of ``data`` with a type in ``types`` has it (ranges are the configs' to check)."""
    for key, value in data.items():
        kind = types.get(key)
        if kind is None:
            continue
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            what = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]
            raise refusal(source, f"{where}.{key}", value, f"expected {what}")


def refusal(source: str, key: str, value: Any, allowed: str) -> MaloraError:
    return MaloraError(f"{source}: {key}: {value!r} is not allowed; {allowed}")


def check_keys(source: str, where: str, data: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(data, dict):
        if not where:
            raise MaloraError(f"{source}: expected a table of sweep settings, got {type(data).__name__}")
        raise refusal(source, where, data, "expected a table (TOML) / object (JSON)")
    unknown = [str(k) for k in data if k not in allowed]
    if unknown:
        name = f"{where}.{unknown[0]}" if where else unknown[0]
        raise MaloraError(f"{source}: unknown key {name!r}; allowed: {', '.join(allowed)}")
    return data


def as_int(source: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise refusal(source, key, value, f"expected an integer >= {minimum}")
    return value


def as_number(source: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise refusal(source, key, value, "expected a number > 0")
    return float(value)


def as_str(source: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise refusal(source, key, value, "expected a non-empty string")
    return value


def as_list(source: str, key: str, value: Any, item) -> tuple:
    if not isinstance(value, list) or not value:
        raise refusal(source, key, value, "expected a non-empty list")
    items = tuple(item(source, f"{key}[{i}]", v) for i, v in enumerate(value))
    if len(set(items)) != len(items):
        raise refusal(source, key, value, "expected a list without repeated values")
    return items
