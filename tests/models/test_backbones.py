"""Tests for dscl.models.backbones: shapes, strides, parameter count, export, registry errors."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch
import torchvision
from torch import nn

from dscl.models import backbones
from dscl.models.backbones import build_backbone, list_backbones, register_backbone

# name -> (out_channels, stride, input side used in the test)
EXPECTED = {
    "resnet32": (64, 4, 32),
    "resnet18": (512, 32, 64),
    "resnet50": (2048, 32, 64),
    "resnext50_32x4d": (2048, 32, 64),
}
TORCHVISION_NAMES = ["resnet18", "resnet50", "resnext50_32x4d"]


def test_registry_lists_the_required_names() -> None:
    assert set(EXPECTED) <= set(list_backbones())
    assert list_backbones() == sorted(list_backbones())


@pytest.mark.parametrize("name", list_backbones())
def test_output_shape_channels_and_stride(name: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name)
    out_channels, stride, side = EXPECTED.get(name, (backbone.out_channels, backbone.stride, 64))
    assert (backbone.out_channels, backbone.stride) == (out_channels, stride)
    fmap = backbone(torch.randn(2, 3, side, side))
    assert fmap.shape == (2, out_channels, side // stride, side // stride)


def test_resnet32_gives_8x8_map_on_32px_and_grayscale_input() -> None:
    torch.manual_seed(0)
    assert build_backbone("resnet32")(torch.randn(3, 3, 32, 32)).shape == (3, 64, 8, 8)
    gray = build_backbone("resnet32", in_channels=1)
    assert gray.conv1.in_channels == 1
    assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 64, 8, 8)


def test_resnet32_parameter_count_and_structure() -> None:
    backbone = build_backbone("resnet32")
    # Hand count: stem 3·16·9 + BN 32 = 464; stage 1: 5 × (2·16·16·9 + 2·32) = 23,360;
    # stage 2: 14,528 (incl. 1×1 shortcut 512 + BN 64) + 4 × 18,560 = 88,768;
    # stage 3: 57,728 (incl. 1×1 shortcut 2,048 + BN 128) + 4 × 73,984 = 353,664. Total 466,256.
    # Check against the known ResNet-32 size of 0.46M (464,154 with option-A shortcuts and a
    # 10-way fc): 466,256 − 2,752 (option-B shortcuts) + 650 (fc) = 464,154.
    assert sum(p.numel() for p in backbone.parameters()) == 466_256
    for stage, first_stride in (("layer1", 1), ("layer2", 2), ("layer3", 2)):
        blocks = getattr(backbone, stage)
        assert len(blocks) == 5
        assert blocks[0].conv1.stride == (first_stride, first_stride)
        has_projection = [isinstance(block.shortcut, nn.Sequential) for block in blocks]
        assert has_projection == [stage != "layer1", False, False, False, False]
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)


def test_resnet32_export_is_its_own_state_dict() -> None:
    backbone = build_backbone("resnet32")
    exported = backbone.export_state_dict()
    state = backbone.state_dict()
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[key], state[key]) for key in state)


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_export_loads_into_torchvision_with_only_fc_missing(name: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    reference = getattr(torchvision.models, name)().eval()
    result = reference.load_state_dict(backbone.export_state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    # Same weights and same layer order: torchvision's logits equal fc(pool(our feature map)).
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = reference.fc(backbone(images).mean(dim=(2, 3)))
        theirs = reference(images)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # float32 rounding only


def test_torchvision_in_channels_replaces_conv1() -> None:
    backbone = build_backbone("resnet18", in_channels=1)
    assert backbone.conv1.weight.shape == (64, 1, 7, 7)
    assert backbone(torch.randn(2, 1, 64, 64)).shape == (2, 512, 2, 2)


def test_replaced_pretrained_stem_keeps_constant_image_response() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
    stem = backbones._replace_stem(conv, 2, keep_weights=True)
    with torch.no_grad():
        rgb = conv(torch.full((1, 3, 16, 16), 0.7))
        two_channel = stem(torch.full((1, 2, 16, 16), 0.7))
    torch.testing.assert_close(two_channel, rgb, rtol=1e-5, atol=1e-6)


def test_unknown_name_raises_listing_names() -> None:
    with pytest.raises(ValueError, match="unknown backbone name 'resnet9000'") as info:
        build_backbone("resnet9000")
    for name in EXPECTED:
        assert name in str(info.value)


@pytest.mark.parametrize("in_channels", [0, -1, 2.0, True])
def test_bad_in_channels_raises(in_channels: object) -> None:
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone("resnet32", in_channels=in_channels)  # type: ignore[arg-type]


def test_resnet32_pretrained_raises() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        build_backbone("resnet32", pretrained=True)


def test_register_duplicate_or_bad_name_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet32")(lambda **kwargs: None)
    with pytest.raises(ValueError, match="timm:"):
        register_backbone("timm:x")


@pytest.mark.skipif(backbones._timm_available(), reason="timm is installed")
def test_timm_name_without_timm_raises_listing_names() -> None:
    with pytest.raises(ValueError, match="timm") as info:
        build_backbone("timm:resnet50")
    assert "resnet32" in str(info.value)


class _FakeTimmModel(nn.Module):
    def __init__(self, in_chans: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 6, 3, stride=4, padding=1)
        self.num_features = 6
        self.feature_info = [{"reduction": 2}, {"reduction": 4}]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


def test_timm_wrapper_with_a_fake_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []

    def create_model(name: str, **kwargs: object) -> nn.Module:
        calls.append({"name": name, **kwargs})
        return _FakeTimmModel(int(kwargs["in_chans"]))  # type: ignore[call-overload]

    fake = types.ModuleType("timm")
    fake.__spec__ = importlib.machinery.ModuleSpec("timm", None)
    fake.create_model = create_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", fake)
    backbone = build_backbone("timm:fake_net", in_channels=1)
    assert calls == [
        {
            "name": "fake_net",
            "pretrained": False,
            "in_chans": 1,
            "num_classes": 0,
            "global_pool": "",
        }
    ]
    assert (backbone.out_channels, backbone.stride) == (6, 4)
    assert backbone(torch.randn(2, 1, 16, 16)).shape == (2, 6, 4, 4)
    assert set(backbone.export_state_dict()) == {"stem.weight", "stem.bias"}


def test_zero_init_residual_equals_torchvisions_flag():
    from dscl.config import build_config
    from dscl.methods import build_method
    from dscl.models import zero_init_residual

    torch.manual_seed(0)
    ours = build_backbone("resnet18")
    assert zero_init_residual(ours) == 8  # every BasicBlock
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(zero_init_residual=True)
    reference = theirs.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert float(ours.layer1[0].bn2.weight.detach().abs().sum()) == 0.0
    cifar = build_backbone("resnet32")
    assert zero_init_residual(cifar) == 15  # 3 stages x 5 blocks
    # the setting reaches every method's backbone; the ImageNet-LT configs set it, as the authors
    cfg = build_config(None, ["method=ce", "model.zero_init_residual=true"])
    zeroed = build_method(cfg, 3).backbone().layer1[0].bn2.weight.detach()
    default = build_method(build_config(None, ["method=ce"]), 3).backbone().layer1[0].bn2.weight
    assert float(zeroed.abs().sum()) == 0.0 and float(default.detach().sum()) > 0
    paper = build_config("imagenet_lt_r50")
    assert paper.model.zero_init_residual and paper.pretrain.queue_size == 65536
