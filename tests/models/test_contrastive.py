"""Tests for dscl.models.contrastive: momentum update, key path, PBSD teacher and student."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dscl import dist
from dscl.models.backbones import build_backbone
from dscl.models.contrastive import ContrastiveModel, ContrastiveOutput, Encoder


class TinyBackbone(nn.Module):
    """Conv-BN-ReLU with stride 2: small enough to check the momentum update by hand."""

    out_channels = 4
    stride = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


def _resnet32_model(queue_size: int = 8, embed_dim: int = 16) -> ContrastiveModel:
    torch.manual_seed(0)
    return ContrastiveModel(build_backbone("resnet32"), embed_dim=embed_dim, queue_size=queue_size)


def test_structure_and_momentum_encoder_is_a_frozen_copy() -> None:
    model = ContrastiveModel(TinyBackbone(), embed_dim=8, queue_size=5)
    assert isinstance(model.query_encoder, Encoder)
    assert model.query_encoder.head.mlp[0].weight.shape == (4, 4)
    assert (model.queue.size, model.queue.dim) == (5, 8)
    query_state = model.query_encoder.state_dict()
    for name, tensor in model.momentum_encoder.state_dict().items():
        assert torch.equal(tensor, query_state[name])
        assert tensor.data_ptr() != query_state[name].data_ptr()
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())
    assert all(p.requires_grad for p in model.query_encoder.parameters())


def test_momentum_update_matches_hand_computation() -> None:
    model = ContrastiveModel(TinyBackbone(), embed_dim=8, queue_size=0)
    query_params = dict(model.query_encoder.named_parameters())
    momentum_params = dict(model.momentum_encoder.named_parameters())
    with torch.no_grad():  # dyadic values: m·a + (1 − m)·b is exact in float32 for m = 0.75
        for index, name in enumerate(query_params):
            shape = query_params[name].shape
            query_params[name].copy_(torch.arange(shape.numel()).view(shape) / 4 + index)
            momentum_params[name].copy_(-torch.arange(shape.numel()).view(shape) / 8 - index)
        model.momentum_encoder.backbone.bn.running_mean.fill_(3.0)
    before = {name: p.clone() for name, p in momentum_params.items()}
    model.update_momentum_encoder(0.75)
    for name, param in momentum_params.items():
        expected = 0.75 * before[name].double() + 0.25 * query_params[name].double()
        assert torch.equal(param.double(), expected), name
    # Buffers are left alone (MoCo): the query encoder's running mean is 0, this one stays 3.
    assert torch.equal(model.momentum_encoder.backbone.bn.running_mean, torch.full((4,), 3.0))


def test_momentum_extremes_and_validation() -> None:
    model = ContrastiveModel(TinyBackbone(), embed_dim=8, queue_size=0)
    with torch.no_grad():
        for param in model.query_encoder.parameters():
            param.add_(1.0)
    before = [p.clone() for p in model.momentum_encoder.parameters()]
    model.update_momentum_encoder(1.0)
    assert all(
        torch.equal(a, b) for a, b in zip(before, model.momentum_encoder.parameters(), strict=True)
    )
    model.update_momentum_encoder(0.0)
    pairs = zip(model.query_encoder.parameters(), model.momentum_encoder.parameters(), strict=True)
    assert all(torch.equal(q, m) for q, m in pairs)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="momentum"):
            model.update_momentum_encoder(bad)


def test_init_momentum_encoder_copies_parameters_and_buffers() -> None:
    model = ContrastiveModel(TinyBackbone(), embed_dim=8, queue_size=0)
    with torch.no_grad():
        for param in model.query_encoder.parameters():
            param.mul_(2.0).add_(0.5)
        model.query_encoder.backbone.bn.running_var.fill_(7.0)
    model.init_momentum_encoder()
    query_state = model.query_encoder.state_dict()
    for name, tensor in model.momentum_encoder.state_dict().items():
        assert torch.equal(tensor, query_state[name]), name
    assert not any(p.requires_grad for p in model.momentum_encoder.parameters())


def test_momentum_encoder_gets_no_gradient() -> None:
    model = ContrastiveModel(TinyBackbone(), embed_dim=8, queue_size=0).train()
    torch.manual_seed(1)
    out = model(
        torch.randn(4, 3, 8, 8),
        torch.randn(4, 3, 8, 8),
        torch.randn(4, 2, 3, 4, 4),
        torch.tensor([0.0, 0.0, 4.0, 4.0]).expand(4, 2, 4),
    )
    assert not out.key.requires_grad and not out.teacher.requires_grad
    logits = out.query @ out.key.T / 0.07  # InfoNCE-like loss of q and k, plus a PBSD-like term
    loss = F.cross_entropy(logits, torch.arange(4)) - (out.student * out.teacher).sum()
    loss.backward()
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    assert all(p.grad is not None for p in model.query_encoder.parameters())


def test_forward_shapes_and_none_without_patches() -> None:
    model = _resnet32_model().train()
    query_view, key_view = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    out = model(query_view, key_view)
    assert isinstance(out, ContrastiveOutput)
    assert out.query.shape == (3, 16) and out.key.shape == (3, 16)
    assert out.teacher is None and out.student is None
    torch.testing.assert_close(out.query.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(out.key.norm(dim=1), torch.ones(3))
    boxes = torch.tensor([0.0, 0.0, 16.0, 16.0]).expand(3, 2, 4)
    out = model(query_view, key_view, torch.randn(3, 2, 3, 16, 16), boxes)
    assert out.teacher.shape == (2, 3, 16) and out.student.shape == (2, 3, 16)


def test_forward_rejects_bad_inputs() -> None:
    model = ContrastiveModel(TinyBackbone(), embed_dim=8, queue_size=0)
    images = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="together"):
        model(images, images, patches=torch.randn(2, 1, 3, 4, 4))
    with pytest.raises(ValueError, match="key_view"):
        model(images, torch.randn(3, 3, 8, 8))
    with pytest.raises(ValueError, match="boxes"):
        model(images, images, torch.randn(2, 1, 3, 4, 4), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="out_channels"):
        ContrastiveModel(nn.Identity())


def test_query_and_key_match_the_encoders_in_eval_mode() -> None:
    model = _resnet32_model().eval()
    with torch.no_grad():
        model.momentum_encoder.head.mlp[2].bias.add_(0.3)  # make the two encoders differ
    query_view, key_view = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    out = model(query_view, key_view)
    with torch.no_grad():
        torch.testing.assert_close(out.query, model.query_encoder(query_view), rtol=0, atol=0)
        torch.testing.assert_close(out.key, model.momentum_encoder(key_view), rtol=0, atol=0)


def test_keys_use_batch_shuffle_with_several_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append("shuffle")
        permutation = torch.tensor([2, 0, 3, 1])
        return x[permutation], torch.argsort(permutation)

    def unshuffle(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        calls.append("unshuffle")
        return x[index]

    model = ContrastiveModel(TinyBackbone(), embed_dim=8, queue_size=0).eval()
    key_view = torch.randn(4, 3, 8, 8)
    single = model(key_view, key_view).key
    assert calls == []
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "batch_shuffle", shuffle)
    monkeypatch.setattr(dist, "batch_unshuffle", unshuffle)
    shuffled = model(key_view, key_view).key
    assert calls == ["shuffle", "unshuffle"]
    torch.testing.assert_close(shuffled, single, rtol=0, atol=1e-6)  # batch order only


def test_whole_view_box_teacher_equals_query() -> None:
    # resnet32 on 32 px: 8×8 map, stride 4. The box (0, 0, 32, 32) becomes, with aligned=True,
    # (−0.5, −0.5, 7.5, 7.5) in feature cells: 2×2 bins of 4 cells, adaptive sampling puts
    # ceil(4) = 4 samples per bin side at spacing 1, i.e. exactly on the cell centres 0 … 7,
    # where bilinear interpolation returns the cell value. The mean of the 2×2 bins is then the
    # global average pool, so t equals q up to float32 summation order: atol 1e-6 on unit
    # vectors (observed ≈1e-7).
    model = _resnet32_model().train()
    batch = 3
    boxes = torch.tensor([0.0, 0.0, 32.0, 32.0]).expand(batch, 1, 4)
    out = model(torch.randn(batch, 3, 32, 32), torch.randn(batch, 3, 32, 32),
                torch.randn(batch, 1, 3, 16, 16), boxes)  # fmt: skip
    torch.testing.assert_close(out.teacher[0], out.query.detach(), rtol=0, atol=1e-6)


def test_whole_view_box_is_only_approximate_on_odd_maps() -> None:
    # On 28 px views the map is 7×7: bins of 3.5 cells sampled at 4 points 0.875 apart fall
    # between cell centres, so the teacher is a bilinear blend, not the global pool. This pins
    # down that the exact match above comes from the sample placement, not from a shortcut.
    model = _resnet32_model().eval()
    boxes = torch.tensor([0.0, 0.0, 28.0, 28.0]).expand(2, 1, 4)
    images = torch.randn(2, 3, 28, 28)
    out = model(images, images, torch.randn(2, 1, 3, 8, 8), boxes)
    difference = (out.teacher[0] - out.query).abs().max()
    assert 1e-4 < difference < 0.2  # close (same image region) but clearly not exact


def test_teacher_matches_cell_means_for_cell_aligned_boxes() -> None:
    # Boxes whose sides span an even number of 4 px cells put every adaptive sample on a cell
    # centre (see above), so t_j = normalize(g(mean of the covered cells)) up to float32
    # summation order (atol 1e-6). This checks spatial_scale = 1/4, the aligned offset, the
    # batch index of each box, the query head, and the (L, B, D) layout.
    model = _resnet32_model().eval()
    with torch.no_grad():
        model.momentum_encoder.head.mlp[0].weight.mul_(-1.0)  # the teacher must use g, not g_m
    cells = [  # per image b, per patch j: (x1, x2, y1, y2) in cells of the 8×8 map
        [(0, 4, 2, 8), (2, 8, 0, 2)],
        [(4, 6, 4, 6), (0, 8, 0, 8)],
        [(2, 4, 0, 6), (6, 8, 6, 8)],
    ]
    boxes = torch.tensor([[[4.0 * x1, 4.0 * y1, 4.0 * x2, 4.0 * y2] for x1, x2, y1, y2 in row]
                          for row in cells])  # fmt: skip
    query_view = torch.randn(3, 3, 32, 32)
    out = model(query_view, torch.randn(3, 3, 32, 32), torch.randn(3, 2, 3, 8, 8), boxes)
    with torch.no_grad():
        fmap = model.query_encoder.feature_map(query_view)
        for b, row in enumerate(cells):
            for j, (x1, x2, y1, y2) in enumerate(row):
                pooled = fmap[b : b + 1, :, y1:y2, x1:x2].mean(dim=(2, 3))
                expected = F.normalize(model.query_encoder.head(pooled), dim=1)[0]
                torch.testing.assert_close(out.teacher[j, b], expected, rtol=0, atol=1e-6)


def test_teacher_is_detached_and_independent_of_patches() -> None:
    model = _resnet32_model().train()
    torch.manual_seed(2)
    query_view, key_view = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    boxes = torch.tensor([[[0.0, 0.0, 16.0, 20.0], [8.0, 4.0, 30.0, 31.0]]]).expand(2, 2, 4)
    first = model(query_view, key_view, torch.randn(2, 2, 3, 8, 8), boxes)
    second = model(query_view, key_view, torch.randn(2, 2, 3, 8, 8) * 3.0, boxes)
    assert not first.teacher.requires_grad and first.teacher.grad_fn is None
    assert first.student.requires_grad
    torch.testing.assert_close(first.teacher, second.teacher, rtol=0, atol=0)
    assert not torch.allclose(first.student, second.student)


def test_student_equals_encoding_each_patch_separately() -> None:
    model = _resnet32_model().eval()
    torch.manual_seed(3)
    batch, num_patches = 3, 2
    patches = torch.randn(batch, num_patches, 3, 8, 8)
    boxes = torch.tensor([0.0, 0.0, 8.0, 8.0]).expand(batch, num_patches, 4)
    images = torch.randn(batch, 3, 32, 32)
    out = model(images, images, patches, boxes)
    assert out.student.shape == (num_patches, batch, 16)
    with torch.no_grad():
        for b in range(batch):
            for j in range(num_patches):
                alone = model.query_encoder(patches[b, j : j + 1])[0]
                # One batched conv vs. one image: same math, different float32 summation
                # blocking; 1e-5 on unit vectors leaves room only for rounding.
                torch.testing.assert_close(out.student[j, b], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_teacher_rois_stay_float32_under_bf16_autocast(monkeypatch, device: str) -> None:
    # 320 images × 5 patches: image indices past 256 are not exact in bf16 (257 -> 256), so a
    # roi built in the autocast dtype cuts the region from a neighbouring image. Under bf16
    # autocast every roi must carry its own image's exact index and the float32 boxes, and
    # every region must come from its own image (image b's map holds b // 16 in its first
    # channel and b % 16 in the others, values a bf16 map holds exactly).
    from torchvision.ops import roi_align as torchvision_roi_align

    import dscl.models.contrastive as contrastive

    seen = {}

    def spy(fmap, rois, **kwargs):
        seen["rois"], seen["regions"] = rois, torchvision_roi_align(fmap, rois, **kwargs)
        return seen["regions"]

    monkeypatch.setattr(contrastive, "roi_align", spy)
    model = _resnet32_model().eval().to(device)
    batch, num_patches = 320, 5
    torch.manual_seed(4)
    corner = torch.rand(batch, num_patches, 2) * 20.0
    boxes = torch.cat([corner, corner + 4.0 + torch.rand(batch, num_patches, 2) * 8.0], dim=2)
    index = torch.arange(batch, dtype=torch.float32)[:, None, None, None]
    fmap = (index % 16).expand(batch, 64, 8, 8).clone()
    fmap[:, 0] = index[:, 0] // 16
    with torch.autocast(device, dtype=torch.bfloat16):
        model._teacher(fmap.to(device, torch.bfloat16), boxes.to(device))
    rois, regions = seen["rois"].cpu(), seen["regions"].cpu()
    expected_index = torch.arange(batch, dtype=torch.float32).repeat_interleave(num_patches)
    assert rois.dtype == torch.float32
    assert torch.equal(rois[:, 0], expected_index)
    assert torch.equal(rois[:, 1:], boxes.reshape(-1, 4))
    cells = regions.float().mean(dim=(2, 3))  # (B·L, C)
    # (B·L,) the index of the image each region came from (bilinear weights leave ~1e-6)
    source = (cells[:, 0] * 16 + cells[:, 1]).round()
    wrong = (source != expected_index).sum().item()
    assert wrong == 0, f"{wrong} of {batch * num_patches} regions cut from another image"
