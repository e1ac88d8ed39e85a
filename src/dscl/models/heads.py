"""Heads on a backbone: projection MLP g (stage 1) and linear classifier (stage 2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LinearClassifier", "ProjectionHead"]


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class ProjectionHead(nn.Module):
    """Projection MLP g: Linear(C, H) - ReLU - Linear(H, D) (docs/DESIGN.md §2.2, H = C by default).

    The output is NOT normalised; the encoder normalises it (q = normalize(g(pool(F(x))))).

    Args:
        in_dim: C, the backbone's feature channels.
        out_dim: D, the embedding size (128 in the paper).
        hidden_dim: H, the hidden width; ``None`` means ``in_dim``.
    """

    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        _check_positive("in_dim", in_dim)
        _check_positive("out_dim", out_dim)
        _check_positive("hidden_dim", hidden_dim)
        self.in_dim, self.out_dim, self.hidden_dim = in_dim, out_dim, hidden_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Project pooled features.

        Args:
            x: (N, C) pooled backbone features.

        Returns:
            (N, D) unnormalised embeddings g(x).
        """
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must have shape (N, {self.in_dim}), got {tuple(x.shape)}")
        return self.mlp(x)


class LinearClassifier(nn.Module):
    """Stage-2 linear classifier W·v + b on frozen, globally pooled backbone features.

    Initialised as in MoCo's linear evaluation: weights N(0, 0.01²), bias 0.

    Args:
        in_dim: C, the backbone's feature channels.
        num_classes: number of classes.
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        _check_positive("in_dim", in_dim)
        _check_positive("num_classes", num_classes)
        self.in_dim, self.num_classes = in_dim, num_classes
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Classify.

        Args:
            x: (N, C) pooled features, or an (N, C, H, W) feature map that is average-pooled first.

        Returns:
            (N, num_classes) float32 logits, also under autocast: the layer runs outside it, in
            float32, since bf16's 8-bit mantissa turns near-ties between many classes (1,000 on
            ImageNet-LT) into wrong top-1 and top-5 answers.
        """
        if x.ndim == 4:
            x = x.mean(dim=(2, 3))  # (N, C, H, W) -> (N, C)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(
                f"x must have shape (N, {self.in_dim}) or (N, {self.in_dim}, H, W), "
                f"got {tuple(x.shape)}"
            )
        with torch.autocast(x.device.type, enabled=False):
            return self.fc(x.float())  # (N, num_classes)


class Classifier(nn.Module):
    """Backbone + global average pool + linear layer: the ``ce`` baseline and the stage-2 model.

    Args:
        backbone: a module returning a feature map (N, C, H, W), with ``out_channels`` C.
        num_classes: number of classes.
    """

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = LinearClassifier(backbone.out_channels, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) images -> (N, C) pooled backbone features."""
        return self.backbone(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) images -> (N, num_classes) logits."""
        return self.fc(self.features(x))
