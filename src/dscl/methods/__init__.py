"""Training methods: one object per method family, built from the config by name.

ce                      cross-entropy on one augmented view      (cross_entropy.py)
supcon, dscl            contrastive, SupCon or decoupled weights  (contrastive.py)
supcon+pbsd, dscl+pbsd  the same plus patch-based self distillation
bcl                     balanced contrastive learning, one stage  (bcl.py)
paco                    parametric contrastive learning, one stage (paco.py)
(stage 2)               linear probe on a frozen backbone         (linear_probe.py)
"""

# Each method module registers itself on import; the order of registration is the order users
# see (ce first).
from dscl.methods import cross_entropy  # noqa: F401

# isort: split
from dscl.methods import contrastive  # noqa: F401

# isort: split
from dscl.methods import bcl, paco  # noqa: F401

# isort: split
from dscl.methods.base import CLASSIFY, VIEWS, DataInfo, Method, StepOutput, method_backbone
from dscl.methods.linear_probe import LinearProbe
from dscl.methods.registry import (
    build_method,
    check_method,
    classifier_mode,
    method_names,
    method_sections,
    register_method,
    register_settings,
    section_names,
    settings_class,
)

__all__ = [
    "CLASSIFY",
    "VIEWS",
    "DataInfo",
    "LinearProbe",
    "Method",
    "StepOutput",
    "build_method",
    "check_method",
    "method_backbone",
    "classifier_mode",
    "method_names",
    "method_sections",
    "register_method",
    "register_settings",
    "section_names",
    "settings_class",
]
