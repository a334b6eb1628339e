"""The one registry helper behind every name-to-object table (λ schedules, suffix modes, eval-set
layouts): register under a name (a second registration of the name is an error, not a silent
overwrite), look a name up (an unknown name lists the known ones), list the names with a filter.

It lives in ``method/`` because that is the lowest layer that registers names; ``eval`` and the tools
import it from here.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from open_clip_starft.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects of one kind by name, in registration order.

    Args:
        kind: what the names name, for messages ("λ schedule", "suffix mode", "eval-set format").
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item`` as ``name``; a name registered twice is a ConfigError."""
        if name in self._items:
            raise ConfigError(f"{self.kind} {name!r} is already registered: pick another name")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of ``add``: ``@registry.register("name")``."""
        return lambda item: self.add(name, item)

    def get(self, name: str) -> T:
        """The item registered as ``name``; an unknown name is a ConfigError listing the known ones."""
        if name not in self._items:
            raise ConfigError(f"unknown {self.kind} {name!r}: use one of {', '.join(self._items)}")
        return self._items[name]

    def names(self, where: Callable[[T], bool] | None = None) -> list[str]:
        """Registered names in registration order, those whose item passes ``where`` if given."""
        return [n for n, item in self._items.items() if where is None or where(item)]

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
