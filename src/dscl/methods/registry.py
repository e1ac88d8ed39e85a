"""The method registry: one :class:`MethodSpec` per name in the config's ``method`` setting, and
the settings sections several methods share.

A method's spec holds everything the rest of the program asks about it: its builder, its own
settings and the shared sections it reads, the defaults its settings gained after runs were
written, the settings that change the shape of its stage-1 checkpoint, and its own classifier.

A builder takes the resolved :class:`~dscl.config.RunConfig` and a
:class:`~dscl.methods.base.DataInfo` (number of classes, training class counts, view settings)
and returns a :class:`~dscl.methods.base.Method`. A method's own settings are a dataclass that
becomes the *section* of its name (``focal.gamma``, ``bcl.scl_weight``): set from YAML and the
command line under the section's name, validated like every other key, recorded in the run's
config only for the methods that use it, and read by the builder with ``cfg.section(name)``.
Shared sections (``dscl.beta``, ``pbsd.weight``) are registered once with
:func:`register_settings` and named by each method that reads them.

Adding a method is one new module in this package that calls :func:`register_method` (the
package imports each of its modules itself) or, from outside the package, any module imported
before the config is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from dscl.errors import ConfigError
from dscl.models.heads import Classifier
from dscl.registry import Registry

Builder = Callable[[Any, Any], Any]
CLASSIFIER_MODES = ("auto", "probe", "keep", "retrain")
# where a method comes in method_names() unless its spec says otherwise: after the shipped ones
LAST = 100


@dataclass(frozen=True)
class ClassifierSpec:
    """A method's own classifier (the module its :meth:`~dscl.methods.base.Method.classifier`
    returns, saved in ``pretrain.pt``) and how stage 2 uses it.

    The classifier is a module with a ``backbone`` attribute, ``features(x)`` (images to pooled
    backbone features, (N, C_f)) and a head module, named by ``head``, that maps those features
    to the logits; ``forward(x)`` gives the logits of images. :class:`~dscl.models.Classifier`
    (a linear layer ``fc``) is one.

    Attributes:
        auto: what ``classifier.mode=auto`` does: ``"keep"`` (one-stage methods: stage 2
            evaluates it and trains nothing) or ``"probe"`` (a new linear probe, as for methods
            without one).
        build: ``build(backbone, num_classes)`` makes a classifier of this kind on
            ``backbone``: for ``classifier.mode=keep`` and ``retrain`` in stage 2, and to rebuild
            the model of a stage-2 checkpoint those modes wrote. The default is
            :class:`~dscl.models.Classifier`.
        head: the module of the classifier that ``classifier.mode=retrain`` trains again on the
            frozen backbone, starting from its stage-1 weights (the entries ``<head>.*`` of the
            saved classifier).
    """

    auto: str = "keep"
    build: Callable[[nn.Module, int], nn.Module] = Classifier
    head: str = "fc"

    def __post_init__(self) -> None:
        if self.auto not in ("keep", "probe"):
            raise ValueError(f"classifier auto mode must be 'keep' or 'probe', got {self.auto!r}")

    def head_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The head's entries of the classifier's ``state`` dict, named as in the head."""
        prefix = f"{self.head}."
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    Attributes:
        name: the value of the ``method`` setting.
        builder: ``builder(cfg, data)`` returns the :class:`~dscl.methods.base.Method`.
        settings: the dataclass of the method's own settings, section ``name``; None for none.
        sections: the shared sections it reads besides its own (e.g. ``("dscl", "pbsd")``).
        added: settings of its own section added after runs of it were written, each with the
            value that reproduces what such a run did: a saved config of this method without the
            setting is read with that value (:func:`dscl.config.upgrade_saved`).
        checkpoint_keys: dotted settings that change the shape of its stage-1 checkpoint's state
            (besides the method, the backbone and the schedule's length, which every method
            shares): resuming its stage 1 checks that they did not change.
        classifier: its own classifier, or None for a method without one.
        order: its place in :func:`method_names` (lower first; equal ones in registration
            order).
    """

    name: str
    builder: Builder
    settings: type | None = None
    sections: tuple[str, ...] = ()
    added: dict[str, Any] = field(default_factory=dict, hash=False)
    checkpoint_keys: tuple[str, ...] = ()
    classifier: ClassifierSpec | None = None
    order: int = LAST

    def uses(self) -> tuple[str, ...]:
        """Every settings section the method reads: its own first."""
        return (self.name, *self.sections) if self.settings is not None else self.sections


_METHODS: Registry[MethodSpec] = Registry(
    duplicate=lambda name: ValueError(f"method {name!r} is registered already"),
    unknown=lambda name, _: ConfigError(
        f"method: {name!r} is not one of {', '.join(method_names())}"
    ),
    same_again=False,
)
_SHARED: dict[str, type] = {}  # shared section name -> settings dataclass


def register_settings(name: str, settings: type) -> type:
    """Register the dataclass ``settings`` as section ``name`` (shared by several methods)."""
    _check_settings(name, settings)
    _SHARED[name] = settings
    return settings


def _check_settings(name: str, settings: type) -> None:
    if not dataclasses.is_dataclass(settings):
        raise TypeError(f"settings of section {name!r} must be a dataclass, got {settings!r}")
    registered = _section_classes().get(name)
    if registered is not None and registered is not settings:
        raise ValueError(f"settings section {name!r} is registered already")


def register(spec: MethodSpec) -> MethodSpec:
    """Add method ``spec`` (registering the same spec again changes nothing)."""
    if spec.name in _METHODS and method_spec(spec.name) == spec:
        return spec
    _METHODS.check_add(spec.name, spec)
    if spec.settings is not None:
        _check_settings(spec.name, spec.settings)
        fields = {f.name for f in dataclasses.fields(spec.settings)}
        for key in spec.added:
            if key not in fields:
                raise ValueError(f"method {spec.name!r}: added setting {key!r} is not a setting")
    elif spec.added:
        raise ValueError(f"method {spec.name!r}: added settings need settings of its own")
    owned = {other.name for other in method_specs() if other.settings is not None}
    for section in spec.sections:  # a shared section, or another method's own
        if section not in _SHARED and section not in owned:
            raise ValueError(
                f"method {spec.name!r}: settings section {section!r} is not registered"
            )
    return _METHODS.add(spec.name, spec)


def register_method(
    name: str,
    *,
    settings: type | None = None,
    sections: tuple[str, ...] = (),
    classifier: str | ClassifierSpec | None = None,
    **spec: Any,
) -> Callable[[Builder], Builder]:
    """Decorator: make ``builder(cfg, data)`` the method called ``name`` (a :class:`MethodSpec`).

    Args:
        name: the value of the ``method`` setting.
        settings: a dataclass of the method's own settings, registered as section ``name``.
        sections: other registered sections the method reads (e.g. ``("dscl", "pbsd")``).
        classifier: for a method whose :meth:`~dscl.methods.base.Method.classifier` returns one
            of its own, what ``classifier.mode=auto`` does with it: ``"keep"`` (one-stage
            methods: stage 2 evaluates it and trains nothing) or ``"probe"`` (a new linear
            probe, as for methods without one), for a :class:`~dscl.models.Classifier`; or a
            :class:`ClassifierSpec` for a classifier of another kind. None: the method has no
            classifier.
        spec: the other fields of :class:`MethodSpec` (``added``, ``checkpoint_keys``,
            ``order``).
    """
    if isinstance(classifier, str):
        if classifier not in ("keep", "probe"):
            raise ValueError(f"method {name!r}: classifier must be None, 'keep' or 'probe'")
        classifier = ClassifierSpec(auto=classifier)

    def add(builder: Builder) -> Builder:
        register(
            MethodSpec(name, builder, settings, tuple(sections), classifier=classifier, **spec)
        )
        return builder

    return add


def unregister_method(name: str) -> None:
    """Remove method ``name``, its own settings section with it (for tests of added methods)."""
    _METHODS.remove(name)


def method_spec(name: str) -> MethodSpec:
    """The spec of method ``name``; ConfigError naming the registered methods if there is none."""
    return _METHODS.get(name)


def method_specs() -> list[MethodSpec]:
    """Every registered method's spec, in the order of :func:`method_names`."""
    return sorted((_METHODS.get(name) for name in _METHODS.names()), key=lambda s: s.order)


def method_names() -> list[str]:
    """The registered method names (``ce`` first)."""
    return [spec.name for spec in method_specs()]


def check_method(name: str) -> None:
    """Raise ConfigError unless ``name`` is a registered method."""
    method_spec(name)


def method_sections(name: str) -> tuple[str, ...]:
    """The settings sections method ``name`` reads (none for an unknown name)."""
    return method_spec(name).uses() if name in _METHODS else ()


def _own_classifier(method: str) -> ClassifierSpec | None:
    """The classifier of method ``method``'s own (None for none, or for an unknown method)."""
    return method_spec(method).classifier if method in _METHODS else None


def classifier_mode(method: str, mode: str) -> str:
    """What stage 2 does for ``method`` under ``classifier.mode=mode``: ``probe`` (a new linear
    layer on the frozen backbone), ``keep`` (the method's own classifier, evaluated as it is) or
    ``retrain`` (the method's classifier retrained on the frozen backbone, class-balanced).

    Raises:
        ConfigError: an unknown mode, or keep/retrain for a method without a classifier.
    """
    if mode not in CLASSIFIER_MODES:
        raise ConfigError(f"classifier.mode: {mode!r} is not one of {', '.join(CLASSIFIER_MODES)}")
    own = _own_classifier(method)
    if mode == "auto":
        return own.auto if own is not None else "probe"
    if mode in ("keep", "retrain") and own is None:
        having = ", ".join(s.name for s in method_specs() if s.classifier is not None) or "none"
        raise ConfigError(
            f"classifier.mode: {mode} needs a method with a classifier of its own ({having}); "
            f"method {method} has none"
        )
    return mode


def stage2_classifier(method: str, mode: str) -> Callable[[nn.Module, int], nn.Module]:
    """``build(backbone, num_classes)`` of the classifier that stage 2 trains or keeps for
    ``method`` in mode ``mode`` (``probe``, ``keep`` or ``retrain``, see :func:`classifier_mode`):
    the method's own kind for keep and retrain, a :class:`~dscl.models.Classifier` for a probe.

    Raises:
        ConfigError: keep or retrain for a method that is not registered or has no classifier.
    """
    if mode not in ("keep", "retrain"):
        return Classifier
    own = _own_classifier(method)
    if own is None:
        raise ConfigError(f"classifier.mode: {mode} of method {method}, which has no classifier")
    return own.build


def _section_classes() -> dict[str, type]:
    """Every settings section's dataclass: the methods' own (in method order, each followed by
    the shared ones it reads), then shared ones no method reads."""
    classes: dict[str, type] = {}
    for spec in method_specs():
        if spec.settings is not None:
            classes[spec.name] = spec.settings
        classes.update((name, _SHARED[name]) for name in spec.sections if name in _SHARED)
    return classes | {name: cls for name, cls in _SHARED.items() if name not in classes}


def section_names() -> list[str]:
    """Every registered settings section."""
    return list(_section_classes())


def settings_class(name: str) -> type:
    """The dataclass of settings section ``name``."""
    classes = _section_classes()
    if name not in classes:
        raise ConfigError(f"{name}: not a settings section ({', '.join(classes)})")
    return classes[name]


def build_method(cfg: Any, data: Any):
    """The method ``cfg.method`` built from ``cfg`` for the training data ``data`` (a
    :class:`~dscl.methods.base.DataInfo`, or just the number of classes)."""
    from dscl.methods.base import DataInfo

    return method_spec(cfg.method).builder(cfg, DataInfo.of(data))
