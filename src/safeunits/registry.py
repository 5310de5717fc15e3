"""`Registry[T]`: name -> item, for everything a user picks by name (step kinds, training objectives, patch methods,
judges, model families, named models, datasets).

Why one type: seven hand-written dicts each had their own duplicate check, "unknown name" message and listing; a
user got a different error wording from each. Here registering a name twice is a bug (ValueError), and an unknown
name is the registry's `UserError` subclass listing the known names and how to add one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from safeunits.errors import UserValueError

T = TypeVar("T")
I = TypeVar("I")


class Registry(Generic[T]):
    """Items of one kind by name, in registration order."""

    def __init__(self, what: str, *, error: type[Exception] = UserValueError, hint: str = "") -> None:
        self.what, self.error, self.hint = what, error, hint
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T, *, replace: bool = False) -> T:
        """Register `item` as `name` (a second registration of a name is a bug unless `replace`)."""
        if name in self._items and not replace:
            raise ValueError(f"a {self.what} named {name!r} is already registered")
        self._items[name] = item
        return item

    def register(self, name: str) -> Callable[[I], I]:
        """Decorator form of `add` for items that are the decorated function or class itself."""

        def decorate(item: I) -> I:
            self.add(name, item)  # type: ignore[arg-type]
            return item

        return decorate

    def get(self, name: str) -> T:
        """The item registered as `name`; an unknown name lists the known ones."""
        try:
            return self._items[name]
        except KeyError:
            hint = f" ({self.hint})" if self.hint else ""
            raise self.error(f"unknown {self.what} {name!r}; choose one of: {', '.join(self._items)}{hint}") from None

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._items)

    def items(self) -> dict[str, T]:
        """A copy of name -> item."""
        return dict(self._items)

    def copy(self) -> Registry[T]:
        """An independent registry with the same items (tests register throw-away items into a copy)."""
        new = Registry[T](self.what, error=self.error, hint=self.hint)
        new._items = dict(self._items)
        return new

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
