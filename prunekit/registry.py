"""A tiny name -> class registry, one per extension point (methods, updates, allocators)."""
from __future__ import annotations

import dataclasses
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes registered by their ``name`` attribute; created from a name and a dict of parameters.

    Registering a name twice is an error, and so is a parameter the class does not have: recipes with a
    typo fail before any work starts.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        name = getattr(cls, "name", "")
        if not name:
            raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered as a {self.kind}")
        if name in self._classes:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._classes[name] = cls
        return cls

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def __getitem__(self, name: str) -> type[T]:
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self._classes))}")
        return self._classes[name]

    def names(self) -> list[str]:
        return sorted(self._classes)

    def create(self, name: str, params: dict | None = None) -> T:
        cls = self[name]
        fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        unknown = set(params or {}) - fields
        if unknown:
            raise ValueError(f"{self.kind} {name!r} has no parameter(s) {sorted(unknown)}; "
                             f"its parameters are {sorted(fields) or 'none'}")
        return cls(**(params or {}))
