"""Tests for dscl.models.heads: projection MLP and linear classifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dscl.models.heads import LinearClassifier, ProjectionHead


def test_projection_head_structure_and_default_hidden_dim() -> None:
    head = ProjectionHead(16, 8)
    layers = list(head.mlp)
    assert [type(layer) for layer in layers] == [nn.Linear, nn.ReLU, nn.Linear]
    assert layers[0].weight.shape == (16, 16) and layers[2].weight.shape == (8, 16)
    wide = ProjectionHead(16, 8, hidden_dim=32)
    assert wide.mlp[0].weight.shape == (32, 16) and wide.mlp[2].weight.shape == (8, 32)
    assert ProjectionHead(16).out_dim == 128


def test_projection_head_matches_formula_and_is_not_normalised() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(6, 4, hidden_dim=5)
    x = torch.randn(3, 6)
    first, second = head.mlp[0], head.mlp[2]
    expected = torch.relu(x @ first.weight.T + first.bias) @ second.weight.T + second.bias
    out = head(x)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)  # float32 rounding only
    assert not torch.allclose(out.norm(dim=1), torch.ones(3))


def test_projection_head_rejects_wrong_input_and_arguments() -> None:
    head = ProjectionHead(6, 4)
    with pytest.raises(ValueError, match="x must have shape"):
        head(torch.randn(3, 5))
    with pytest.raises(ValueError, match="in_dim"):
        ProjectionHead(0)
    with pytest.raises(ValueError, match="out_dim"):
        ProjectionHead(4, out_dim=-1)
    with pytest.raises(ValueError, match="hidden_dim"):
        ProjectionHead(4, hidden_dim=0)


def test_linear_classifier_shapes_init_and_pooling() -> None:
    torch.manual_seed(0)
    classifier = LinearClassifier(8, 5)
    assert torch.count_nonzero(classifier.fc.bias) == 0
    assert classifier.fc.weight.abs().max() < 0.1  # N(0, 0.01²): 40 draws far below 10 σ
    fmap = torch.randn(2, 8, 3, 3)
    pooled = fmap.mean(dim=(2, 3))
    assert classifier(pooled).shape == (2, 5)
    torch.testing.assert_close(classifier(fmap), classifier(pooled), rtol=0, atol=0)
    expected = pooled @ classifier.fc.weight.T + classifier.fc.bias
    torch.testing.assert_close(classifier(pooled), expected, rtol=0, atol=1e-6)


def test_linear_classifier_rejects_wrong_input_and_arguments() -> None:
    classifier = LinearClassifier(8, 5)
    with pytest.raises(ValueError, match="x must have shape"):
        classifier(torch.randn(2, 7))
    with pytest.raises(ValueError, match="num_classes"):
        LinearClassifier(8, 0)
    with pytest.raises(ValueError, match="in_dim"):
        LinearClassifier(True, 3)  # type: ignore[arg-type]


def test_classifier_logits_are_float32_under_bf16_autocast() -> None:
    # The final layer runs outside autocast: with 1,000 classes, bf16 logits (8-bit mantissa)
    # tie or swap near-equal classes. Under CPU bf16 autocast the evaluation path's logits must
    # be float32 and equal the float32 layer applied to the (bf16) pooled features.
    from dscl.engine.evaluate import predict_logits
    from dscl.models.heads import Classifier

    class Pool(nn.Module):
        out_channels = 64

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.conv2d(x, torch.ones(64, 3, 1, 1) / 3)  # (N, 64, H, W)

    torch.manual_seed(0)
    model = Classifier(Pool(), num_classes=1000)
    images = torch.randn(32, 3, 4, 4)
    logits, _ = predict_logits(model, [(images, torch.zeros(32))], "cpu", amp_dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.features(images)
    expected = model.fc.fc(features.float())
    assert torch.equal(logits, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(images).dtype == torch.float32
