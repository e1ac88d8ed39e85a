"""The method registry: names in the config's ``method`` setting mapped to builders.

A builder takes the resolved :class:`~dscl.config.RunConfig` and the number of classes and
returns a :class:`~dscl.methods.base.Method`. Adding a method is one new module that calls
:func:`register_method` plus one import line in ``dscl/methods/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dscl.errors import ConfigError

Builder = Callable[[Any, int], Any]
_BUILDERS: dict[str, Builder] = {}


def register_method(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make ``builder(cfg, num_classes)`` the method called ``name``."""

    def add(builder: Builder) -> Builder:
        if name in _BUILDERS and _BUILDERS[name] is not builder:
            raise ValueError(f"method {name!r} is registered already")
        _BUILDERS[name] = builder
        return builder

    return add


def method_names() -> list[str]:
    """The registered method names, in registration order."""
    return list(_BUILDERS)


def check_method(name: str) -> None:
    """Raise ConfigError unless ``name`` is a registered method."""
    if name not in _BUILDERS:
        raise ConfigError(f"method: {name!r} is not one of {', '.join(_BUILDERS)}")


def build_method(cfg: Any, num_classes: int):
    """The method ``cfg.method`` built from ``cfg`` for ``num_classes`` classes."""
    check_method(cfg.method)
    return _BUILDERS[cfg.method](cfg, num_classes)
