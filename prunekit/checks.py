"""Values checked against the types their dataclass declares, in one place for every config and parameter.

A setting can arrive from Python, a YAML recipe or a command-line flag. YAML and ``--method-param KEY=VALUE`` give
strings where a user quoted a value (``recalibrate_bn: "false"`` is a non-empty, so truthy, string), and Python
callers can pass anything. Every config dataclass (``PruneConfig``, recipes, the fine-tune schedule) and every
registered method, update, allocation and structured method is checked here before it is used, so a value of the
wrong kind is one line naming the setting, the expected kind and the value, before any loading or work.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any

from .errors import PrunekitError


@functools.cache
def declared_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of the dataclass ``cls`` (``from __future__`` strings resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` is of the declared type ``hint`` (unions, optionals, ``Literal``, tuples and dicts of
    a type; ``bool`` is not an ``int``; an ``int`` is a ``float``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(accepts(arm, value) for arm in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is tuple or hint is tuple:
        return isinstance(value, tuple) and _items_accepted(args, value)
    if origin is list or hint is list:
        return isinstance(value, list) and all(accepts(args[0], v) for v in value) if args else isinstance(value, list)
    if origin is dict or hint is dict:
        return isinstance(value, Mapping) and (not args or all(accepts(args[1], v) for v in value.values()))
    return isinstance(hint, type) and isinstance(value, hint)


def _items_accepted(args: tuple, value: tuple) -> bool:
    if not args:
        return True
    if len(args) == 2 and args[1] is Ellipsis:
        return all(accepts(args[0], v) for v in value)
    return len(args) == len(value) and all(accepts(a, v) for a, v in zip(args, value))


def describe(hint: Any) -> str:
    """``int | None`` -> 'an integer or nothing (null)', for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arm) for arm in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        type(None): "nothing (null)",
        tuple: "a list",
        list: "a list",
        dict: "a mapping of KEY: VALUE",
    }
    base = origin or hint
    if base in (tuple, list) and args:
        return f"a list of {describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return names.get(base, getattr(base, "__name__", str(base)))


def check_types(values: Mapping[str, Any], cls: type, what: str) -> dict[str, Any]:
    """Every value in ``values`` (field name -> value) against the field's declared type in ``cls``; returns them
    with integers given for a ``float`` field as floats. Unknown names are left to the caller."""
    hints = declared_types(cls)
    out = dict(values)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is None:
            continue
        if not accepts(hint, value):
            raise PrunekitError(wrong_type(what, name, hint, value))
        if hint is float and isinstance(value, int):
            out[name] = float(value)
    return out


def wrong_type(what: str, name: str, hint: Any, value: Any) -> str:
    text = f"{what}: {name} must be {describe(hint)}, got {value!r} ({type(value).__name__})"
    if isinstance(value, str) and (value.lower() in ("true", "false", "yes", "no", "null") or _numeric(value)):
        text += "; it was given as a string: write it without quotes (YAML) or as a plain value (Python)"
    return text


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_dataclass(obj: Any, what: str) -> None:
    """``check_types`` on a dataclass instance's own field values, widening ints for float fields in place
    (frozen dataclasses included)."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for name, value in check_types(values, type(obj), what).items():
        if value is not values[name]:
            object.__setattr__(obj, name, value)
