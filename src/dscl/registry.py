"""One name -> builder map, shared by the method registry (:mod:`dscl.methods.registry`) and the
backbone registry (:mod:`dscl.models.backbones`).

Each user chooses its own errors: ``duplicate(name)`` for a name registered a second time and
``unknown(name, names)`` for a name that is not registered (``names`` in registration order), so
every message stays the caller's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Builders by name, in registration order.

    Args:
        duplicate: the error for adding a name that holds another builder already.
        unknown: the error for getting a name that is not registered, given the name and the
            registered names.
        same_again: adding the builder a name holds already is a no-op (True) or is refused
            like any other builder (False).
    """

    def __init__(
        self,
        *,
        duplicate: Callable[[str], Exception],
        unknown: Callable[[str, list[str]], Exception],
        same_again: bool = True,
    ) -> None:
        self._builders: dict[str, T] = {}
        self._duplicate = duplicate
        self._unknown = unknown
        self._same_again = same_again

    def check_add(self, name: str, builder: T) -> None:
        """Raise the duplicate error if :meth:`add` would refuse ``builder`` under ``name``."""
        if name in self._builders and not (self._same_again and self._builders[name] is builder):
            raise self._duplicate(name)

    def add(self, name: str, builder: T) -> T:
        """Register ``builder`` as ``name`` and return it; a second builder for a name is
        refused."""
        self.check_add(name, builder)
        self._builders[name] = builder
        return builder

    def get(self, name: str) -> T:
        """The builder of ``name``; the unknown-name error if there is none."""
        if name not in self._builders:
            raise self._unknown(name, self.names())
        return self._builders[name]

    def remove(self, name: str) -> None:
        """Forget ``name`` (nothing happens for a name that is not registered)."""
        self._builders.pop(name, None)

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __len__(self) -> int:
        return len(self._builders)
