"""Backbone registry: CIFAR-style ResNet-32, torchvision ResNets/ResNeXts and (optionally) timm.

Every backbone is an ``nn.Module`` whose ``forward(x)`` maps images ``(N, C_in, H, W)`` to its
LAST feature map ``F`` of shape ``(N, out_channels, H / stride, W / stride)``, without pooling,
so that the contrastive model can both pool it (q = g(pool(F(x_q)))) and RoIAlign it at the
patch boxes (the PBSD teacher, docs/DESIGN.md §2.5). Each backbone carries ``out_channels``
(C) and ``stride`` (s), and a method ``export_state_dict()`` whose keys follow the reference
implementation (torchvision's names for torchvision models, so the weights load into
``torchvision.models.<name>()`` with only ``fc.*`` missing).

Backbones are registered with ``@register_backbone("name")`` and built by one factory,
``build_backbone(name, in_channels=..., pretrained=...)``. ``pretrained=True`` downloads
torchvision's default ImageNet weights (or timm's) and is therefore only done on explicit
request; nothing is downloaded otherwise.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from functools import partial

import torch
import torchvision
from torch import Tensor, nn

from dscl.registry import Registry

__all__ = [
    "Backbone",
    "BasicBlock",
    "CifarResNet",
    "TorchvisionResNet",
    "build_backbone",
    "list_backbones",
    "register_backbone",
]

TIMM_PREFIX = "timm:"


class Backbone(nn.Module):
    """Base class fixing the backbone interface.

    Attributes:
        out_channels: channels C of the last feature map.
        stride: total down-sampling factor s of the last feature map (input side / map side).
    """

    out_channels: int
    stride: int

    def export_state_dict(self) -> dict[str, Tensor]:
        """Return the weights under the reference implementation's parameter names."""
        return dict(self.state_dict())


BackboneBuilder = Callable[..., Backbone]
_REGISTRY: Registry[BackboneBuilder] = Registry(
    duplicate=lambda name: ValueError(f"name {name!r} is already registered"),
    unknown=lambda name, names: ValueError(
        f"unknown backbone name {name!r}; available: {', '.join(sorted(names))}"
        + (f" or '{TIMM_PREFIX}<model_name>'" if _timm_available() else "")
    ),
    same_again=False,
)


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator registering ``builder(*, in_channels: int, pretrained: bool) -> Backbone``."""
    if not name or name.startswith(TIMM_PREFIX):
        raise ValueError(f"name must be non-empty and not start with {TIMM_PREFIX!r}, got {name!r}")

    def decorator(builder: BackboneBuilder) -> BackboneBuilder:
        return _REGISTRY.add(name, builder)

    return decorator


def list_backbones() -> list[str]:
    """Sorted names accepted by :func:`build_backbone` (besides ``timm:<model>`` with timm)."""
    return sorted(_REGISTRY.names())


def build_backbone(name: str, *, in_channels: int = 3, pretrained: bool = False) -> Backbone:
    """Build a registered backbone.

    Args:
        name: a name from :func:`list_backbones`, or ``"timm:<model_name>"`` if timm is installed.
        in_channels: image channels C_in (1 for grayscale data such as Fashion-MNIST).
        pretrained: load the library's default ImageNet weights. This DOWNLOADS them (torchvision
            or timm cache) and is never done unless asked for. With ``in_channels != 3`` the
            pretrained RGB stem filters are averaged over colour and repeated.

    Returns:
        The backbone; ``forward`` maps (N, C_in, H, W) to (N, out_channels, H/stride, W/stride).

    Raises:
        ValueError: unknown name (the message lists the available ones) or bad arguments.
    """
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if name.startswith(TIMM_PREFIX):
        return TimmBackbone(
            name[len(TIMM_PREFIX) :], in_channels=in_channels, pretrained=pretrained
        )
    return _REGISTRY.get(name)(in_channels=in_channels, pretrained=pretrained)


def zero_init_residual(backbone: nn.Module) -> int:
    """Zero the scale of the last batch norm of every residual block (torchvision's
    ``zero_init_residual``, which the authors' ImageNet runs use), so each block starts as the
    identity. Consumes no random numbers: applied after building, it gives the same weights as
    torchvision's flag. Returns how many blocks were changed (0: the backbone has none)."""
    from torchvision.models.resnet import BasicBlock as TVBasic
    from torchvision.models.resnet import Bottleneck

    changed = 0
    for module in backbone.modules():
        last = None
        if isinstance(module, Bottleneck):
            last = module.bn3
        elif isinstance(module, (TVBasic, BasicBlock)):
            last = module.bn2
        if last is not None and last.weight is not None:
            nn.init.zeros_(last.weight)
            changed += 1
    return changed


# --------------------------------------------------------------------------- CIFAR ResNet-32


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity or option-B (1×1 conv + BN) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_planes, H, W) -> (N, planes, H / stride, W / stride)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(Backbone):
    """CIFAR-style ResNet (He et al. 2016, §4.2): 3×3 stem, three stages of ``blocks_per_stage``
    basic blocks with widths 16/32/64 and strides 1/2/2. 32×32 inputs give an 8×8 map (stride 4).

    Args:
        blocks_per_stage: n, giving depth 6n + 2 (5 for ResNet-32).
        in_channels: image channels C_in.
    """

    def __init__(self, blocks_per_stage: int = 5, in_channels: int = 3) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        widths, strides = (16, 32, 64), (1, 2, 2)
        in_planes = 16
        for index, (planes, stride) in enumerate(zip(widths, strides, strict=True), start=1):
            blocks = []
            for block_index in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if block_index == 0 else 1))
                in_planes = planes
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.out_channels = 64
        self.stride = 4
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, 64, H / 4, W / 4)."""
        x = self.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))


@register_backbone("resnet32")
def resnet32(*, in_channels: int = 3, pretrained: bool = False) -> Backbone:
    """CIFAR ResNet-32 (0.47M parameters with option-B shortcuts); no pretrained weights exist."""
    if pretrained:
        raise ValueError("pretrained=True is not available for 'resnet32'")
    return CifarResNet(blocks_per_stage=5, in_channels=in_channels)


# --------------------------------------------------------------------- torchvision ResNets


class TorchvisionResNet(Backbone):
    """A torchvision ResNet/ResNeXt without ``avgpool`` and ``fc``, keeping torchvision's
    parameter names (``conv1``, ``bn1``, ``layer1`` … ``layer4``). Stride 32.

    Args:
        arch: torchvision builder name, e.g. ``"resnet50"``.
        in_channels: image channels; anything but 3 replaces ``conv1``.
        pretrained: load torchvision's DEFAULT weights (a download; only on explicit request).
    """

    def __init__(self, arch: str, *, in_channels: int = 3, pretrained: bool = False) -> None:
        super().__init__()
        weights = torchvision.models.get_model_weights(arch).DEFAULT if pretrained else None
        net = torchvision.models.get_model(arch, weights=weights)
        if in_channels != 3:
            net.conv1 = _replace_stem(net.conv1, in_channels, keep_weights=pretrained)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.out_channels = net.fc.in_features
        self.stride = 32

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, out_channels, H / 32, W / 32) (rounded up at each stage)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _replace_stem(conv: nn.Conv2d, in_channels: int, *, keep_weights: bool) -> nn.Conv2d:
    """A copy of the 7×7 stem for ``in_channels`` inputs; with ``keep_weights`` the RGB filters
    are averaged and scaled by 3 / in_channels so a constant input gives the same response."""
    stem = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        bias=False,
    )
    if keep_weights:
        with torch.no_grad():
            mean = conv.weight.mean(dim=1, keepdim=True)  # (C_out, 1, k, k)
            stem.weight.copy_(mean.expand_as(stem.weight) * (3.0 / in_channels))
    else:
        nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
    return stem


for _arch in ("resnet18", "resnet50", "resnet101", "resnet152", "resnext50_32x4d"):
    register_backbone(_arch)(partial(TorchvisionResNet, _arch))


# ------------------------------------------------------------------------------------ timm


def _timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


class TimmBackbone(Backbone):
    """A timm CNN's ``forward_features`` (its last feature map, no pooling).

    Args:
        model_name: a ``timm.create_model`` name, e.g. ``"resnet50"``.
        in_channels: image channels (timm adapts the stem itself).
        pretrained: load timm's pretrained weights (a download; only on explicit request).
    """

    def __init__(self, model_name: str, *, in_channels: int = 3, pretrained: bool = False) -> None:
        super().__init__()
        if not _timm_available():
            raise ValueError(
                f"backbone {TIMM_PREFIX + model_name!r} needs the optional package timm, which is "
                f"not installed; available: {', '.join(list_backbones())}"
            )
        timm = importlib.import_module("timm")
        self.model = timm.create_model(
            model_name, pretrained=pretrained, in_chans=in_channels, num_classes=0, global_pool=""
        )
        self.out_channels = int(self.model.num_features)
        self.stride = int(self.model.feature_info[-1]["reduction"])

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, out_channels, H / stride, W / stride)."""
        fmap = self.model.forward_features(x)
        if fmap.ndim != 4:  # e.g. vision transformers return tokens (N, T, C)
            raise ValueError(f"timm model gave a {fmap.ndim}-D output; only CNN feature maps work")
        return fmap

    def export_state_dict(self) -> dict[str, Tensor]:
        """timm's own parameter names (without this wrapper's ``model.`` prefix)."""
        return dict(self.model.state_dict())
