"""Models: backbones, heads, the labelled queue and the contrastive (query/momentum) model."""

from dscl.models.backbones import (
    Backbone,
    build_backbone,
    list_backbones,
    register_backbone,
    zero_init_residual,
)
from dscl.models.contrastive import ContrastiveModel, ContrastiveOutput, Encoder
from dscl.models.heads import Classifier, LinearClassifier, ProjectionHead
from dscl.models.queue import LabelledQueue

__all__ = [
    "Backbone",
    "Classifier",
    "ContrastiveModel",
    "ContrastiveOutput",
    "Encoder",
    "LabelledQueue",
    "LinearClassifier",
    "ProjectionHead",
    "build_backbone",
    "list_backbones",
    "register_backbone",
    "zero_init_residual",
]
