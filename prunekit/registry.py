"""A tiny name -> object registry, one per extension point (methods, updates, groups, allocators, ...)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Generic, TypeVar

from .checks import check_types
from .errors import PrunekitError

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes (or functions) registered by name; classes are created from a name and a dict of parameters.

    Registering a name twice is an error, and so is a parameter the class does not have: recipes with a
    typo fail before any work starts.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, obj: T | None = None, *, name: str | None = None):
        """Register ``obj`` under ``name`` (default: its ``name`` attribute). Usable as ``@register`` and
        ``@register(name="...")``."""
        if obj is None:
            return lambda o: self.register(o, name=name)
        name = name or getattr(obj, "name", "")
        if not name or not isinstance(name, str):
            raise PrunekitError(f"{getattr(obj, '__name__', obj)!r} needs a name to be registered as a {self.kind}")
        if name in self._entries:
            raise PrunekitError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = obj
        return obj

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            raise PrunekitError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def create(self, name: str, params: dict | None = None):
        """An instance of the class registered as ``name`` with ``params`` as its (dataclass) fields."""
        cls = self[name]
        check_params(self.kind, name, cls, params)
        if dataclasses.is_dataclass(cls):
            params = check_types(params or {}, cls, f"{self.kind} {name!r}")
        return cls(**(params or {}))


def check_params(kind: str, name: str, cls: Callable, params: dict | None) -> None:
    """Every key of ``params`` must be a field of the dataclass ``cls``."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    unknown = set(params or {}) - fields
    if unknown:
        raise PrunekitError(
            f"{kind} {name!r} has no parameter(s) {sorted(unknown)}; its parameters are {sorted(fields) or 'none'}"
        )
