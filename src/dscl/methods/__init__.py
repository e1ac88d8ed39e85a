"""Training methods: one object per method family, built from the config by name.

ce                      cross-entropy on one augmented view      (cross_entropy.py)
supcon, dscl            contrastive, SupCon or decoupled weights  (contrastive.py)
supcon+pbsd, dscl+pbsd  the same plus patch-based self distillation
bcl                     balanced contrastive learning, one stage  (bcl.py)
paco                    parametric contrastive learning, one stage (paco.py)
(stage 2)               linear probe on a frozen backbone         (linear_probe.py)

Every module of this package is imported here, in the order of its name, so a method module
registers itself (:func:`register_method`) without a line of its own in this file; the order
users see (``ce`` first) is each MethodSpec's ``order``.
"""

import importlib
import pkgutil

from dscl.methods.base import CLASSIFY, VIEWS, DataInfo, Method, StepOutput, method_backbone
from dscl.methods.linear_probe import LinearProbe
from dscl.methods.registry import (
    ClassifierSpec,
    MethodSpec,
    build_method,
    check_method,
    classifier_mode,
    method_names,
    method_sections,
    method_spec,
    method_specs,
    register,
    register_method,
    register_settings,
    section_names,
    settings_class,
    stage2_classifier,
    unregister_method,
)

for _module in sorted(info.name for info in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "CLASSIFY",
    "VIEWS",
    "ClassifierSpec",
    "DataInfo",
    "LinearProbe",
    "Method",
    "MethodSpec",
    "StepOutput",
    "build_method",
    "check_method",
    "classifier_mode",
    "method_backbone",
    "method_names",
    "method_sections",
    "method_spec",
    "method_specs",
    "register",
    "register_method",
    "register_settings",
    "section_names",
    "settings_class",
    "stage2_classifier",
    "unregister_method",
]
