"""A tiny name -> factory registry shared by models, losses and datasets.

Unknown names raise a KeyError that lists close matches, so a typo in a config
(`segformer_bo`) tells the user what they meant.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def suggest(name: str, choices: list[str] | tuple[str, ...] | set[str], n: int = 3) -> str:
    """Return ' Did you mean: a, b?' (or '') for an unknown `name`."""
    close = difflib.get_close_matches(str(name), sorted(map(str, choices)), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


class Registry(Generic[T]):
    """``kind`` names the registry in messages. ``name_attr``: when set, registering an object also stores its
    registry name on it under that attribute (unless the object defines the attribute itself, e.g. an alias
    registered a second time), so the name is written once, in ``register("name")``: losses name their terms
    after it (``DistillLoss.term_name``)."""

    def __init__(self, kind: str, name_attr: str | None = None) -> None:
        self.kind = kind
        self.name_attr = name_attr
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            key = name or getattr(obj, "__name__")
            if key in self._items:
                raise KeyError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            if self.name_attr and self.name_attr not in vars(obj):
                setattr(obj, self.name_attr, key)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def remove(self, name: str) -> T:
        """Unregister ``name`` (plugins reloading themselves, tests cleaning up); returns the object."""
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}.{suggest(name, self._items)}")
        return self._items.pop(name)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(
                f"unknown {self.kind} {name!r}.{suggest(name, self._items)} "
                f"Available: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
