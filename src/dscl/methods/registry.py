"""The method registry: names in the config's ``method`` setting mapped to builders, and the
methods' own settings.

A builder takes the resolved :class:`~dscl.config.RunConfig` and a
:class:`~dscl.methods.base.DataInfo` (number of classes, training class counts, view settings)
and returns a :class:`~dscl.methods.base.Method`. A method's own settings are a dataclass
registered as a *section* (``dscl.beta``, ``pbsd.weight``, ``focal.gamma``): set from YAML and
the command line under the section's name, validated like every other key, recorded in the run's
config only for the methods that use it, and read by the builder with ``cfg.section(name)``.
Adding a method is one new module that calls :func:`register_method` plus one import line in
``dscl/methods/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from dscl.errors import ConfigError
from dscl.registry import Registry

Builder = Callable[[Any, Any], Any]
_BUILDERS: Registry[Builder] = Registry(
    duplicate=lambda name: ValueError(f"method {name!r} is registered already"),
    unknown=lambda name, names: ConfigError(f"method: {name!r} is not one of {', '.join(names)}"),
)
_SECTIONS: dict[str, type] = {}  # section name -> settings dataclass
_USES: dict[str, tuple[str, ...]] = {}  # method name -> the sections it reads
# method name -> what classifier.mode=auto means for it, for a method with its own classifier
_CLASSIFIER: dict[str, str] = {}
CLASSIFIER_MODES = ("auto", "probe", "keep", "retrain")


def register_settings(name: str, settings: type) -> type:
    """Register the dataclass ``settings`` as section ``name`` (shared by several methods)."""
    if not dataclasses.is_dataclass(settings):
        raise TypeError(f"settings of section {name!r} must be a dataclass, got {settings!r}")
    if name in _SECTIONS and _SECTIONS[name] is not settings:
        raise ValueError(f"settings section {name!r} is registered already")
    _SECTIONS[name] = settings
    return settings


def register_method(
    name: str,
    *,
    settings: type | None = None,
    sections: tuple[str, ...] = (),
    classifier: str | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator: make ``builder(cfg, data)`` the method called ``name``.

    Args:
        name: the value of the ``method`` setting.
        settings: a dataclass of the method's own settings, registered as section ``name``.
        sections: other registered sections the method reads (e.g. ``("dscl", "pbsd")``).
        classifier: for a method whose :meth:`~dscl.methods.base.Method.classifier` returns one
            of its own, what ``classifier.mode=auto`` does with it: ``"keep"`` (one-stage
            methods: stage 2 evaluates it and trains nothing) or ``"probe"`` (a new linear
            probe, as for methods without one). None: the method has no classifier.
    """
    if classifier not in (None, "keep", "probe"):
        raise ValueError(f"method {name!r}: classifier must be None, 'keep' or 'probe'")

    def add(builder: Builder) -> Builder:
        _BUILDERS.check_add(name, builder)
        uses = tuple(sections)
        if settings is not None:
            register_settings(name, settings)
            uses = (name, *uses)
        for section in uses:
            if section not in _SECTIONS:
                raise ValueError(f"method {name!r}: settings section {section!r} is not registered")
        _BUILDERS.add(name, builder)
        _USES[name] = uses
        if classifier is not None:
            _CLASSIFIER[name] = classifier
        return builder

    return add


def unregister_method(name: str) -> None:
    """Remove method ``name`` and its own settings section (for tests of added methods)."""
    _BUILDERS.remove(name)
    _USES.pop(name, None)
    _SECTIONS.pop(name, None)
    _CLASSIFIER.pop(name, None)


def method_names() -> list[str]:
    """The registered method names, in registration order."""
    return _BUILDERS.names()


def check_method(name: str) -> None:
    """Raise ConfigError unless ``name`` is a registered method."""
    _BUILDERS.get(name)


def method_sections(name: str) -> tuple[str, ...]:
    """The settings sections method ``name`` reads (none for an unknown name)."""
    return _USES.get(name, ())


def classifier_mode(method: str, mode: str) -> str:
    """What stage 2 does for ``method`` under ``classifier.mode=mode``: ``probe`` (a new linear
    layer on the frozen backbone), ``keep`` (the method's own classifier, evaluated as it is) or
    ``retrain`` (the method's classifier retrained on the frozen backbone, class-balanced).

    Raises:
        ConfigError: an unknown mode, or keep/retrain for a method without a classifier.
    """
    if mode not in CLASSIFIER_MODES:
        raise ConfigError(f"classifier.mode: {mode!r} is not one of {', '.join(CLASSIFIER_MODES)}")
    own = _CLASSIFIER.get(method)
    if mode == "auto":
        return own or "probe"
    if mode in ("keep", "retrain") and own is None:
        having = ", ".join(_CLASSIFIER) or "none"
        raise ConfigError(
            f"classifier.mode: {mode} needs a method with a classifier of its own ({having}); "
            f"method {method} has none"
        )
    return mode


def section_names() -> list[str]:
    """Every registered settings section."""
    return list(_SECTIONS)


def settings_class(name: str) -> type:
    """The dataclass of settings section ``name``."""
    if name not in _SECTIONS:
        raise ConfigError(f"{name}: not a settings section ({', '.join(_SECTIONS)})")
    return _SECTIONS[name]


def build_method(cfg: Any, data: Any):
    """The method ``cfg.method`` built from ``cfg`` for the training data ``data`` (a
    :class:`~dscl.methods.base.DataInfo`, or just the number of classes)."""
    from dscl.methods.base import DataInfo

    return _BUILDERS.get(cfg.method)(cfg, DataInfo.of(data))
