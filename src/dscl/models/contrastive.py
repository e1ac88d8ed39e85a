"""Query/momentum encoders and the stage-1 forward pass returning embeddings (docs/DESIGN.md §2.5).

Notation: B batch, C feature channels, D embedding size, L patches per image, s backbone stride.

    q   = normalize(g(pool(F(x_q))))                         query embedding (with gradient)
    k   = normalize(g_m(pool(F_m(x_k))))                     key embedding (momentum encoder)
    t_j = normalize(g(mean_2x2(RoIAlign(F(x_q), box_j, 1/s))))   PBSD teacher (stop-gradient)
    u_j = normalize(g(pool(F(patch_j))))                     PBSD student (with gradient)

The model computes embeddings only; the engine combines them into losses and then enqueues the
keys (``model.queue.enqueue``) after both losses are computed.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from dscl import dist
from dscl.models.heads import ProjectionHead
from dscl.models.queue import LabelledQueue

__all__ = ["ContrastiveModel", "ContrastiveOutput", "Encoder"]

# Adaptive RoIAlign sampling (torchvision's -1): each of the 2×2 bins is sampled on a grid of
# ceil(bin side / 1 feature cell) points per axis, i.e. about one sample per feature cell, so a
# large box is averaged over all the cells it covers instead of 2×2 points per bin (the usual
# detection setting, which would read only 16 points of a whole 8×8 map). With aligned=True a
# box covering the whole view of an even-sided map then puts every sample exactly on a cell
# centre, and the teacher reduces to the global average pool used for q.
ROI_SAMPLING_RATIO = -1


class ContrastiveOutput(NamedTuple):
    """Embeddings of one stage-1 step (all L2-normalised).

    Attributes:
        query: (B, D) q, with gradient.
        key: (B, D) k from the momentum encoder, no gradient.
        teacher: (L, B, D) t (stop-gradient), or None without patches.
        student: (L, B, D) u, with gradient, or None without patches.
    """

    query: Tensor
    key: Tensor
    teacher: Tensor | None
    student: Tensor | None


class Encoder(nn.Module):
    """Backbone f followed by projection head g, with L2-normalised output.

    Args:
        backbone: module mapping (N, C_in, H, W) to its last feature map (N, C, H/s, W/s),
            with attributes ``out_channels`` (C) and ``stride`` (s).
        head: projection head g with ``in_dim`` C.
    """

    def __init__(self, backbone: nn.Module, head: ProjectionHead) -> None:
        super().__init__()
        for attribute in ("out_channels", "stride"):
            if not isinstance(getattr(backbone, attribute, None), int):
                raise ValueError(f"backbone must have an int attribute {attribute!r}")
        if head.in_dim != backbone.out_channels:
            raise ValueError(
                f"head.in_dim ({head.in_dim}) must equal backbone.out_channels "
                f"({backbone.out_channels})"
            )
        self.backbone = backbone
        self.head = head

    @property
    def stride(self) -> int:
        """s, the backbone's total stride."""
        return int(self.backbone.stride)

    def feature_map(self, x: Tensor) -> Tensor:
        """F(x): (N, C_in, H, W) images -> (N, C, H/s, W/s) last feature map."""
        return self.backbone(x)

    def embed_pooled(self, pooled: Tensor) -> Tensor:
        """normalize(g(v)): (N, C) pooled features -> (N, D) unit embeddings."""
        return F.normalize(self.head(pooled), dim=1)

    def embed_feature_map(self, fmap: Tensor) -> Tensor:
        """normalize(g(pool(F))): (N, C, h, w) feature map -> (N, D) unit embeddings."""
        return self.embed_pooled(fmap.mean(dim=(2, 3)))  # (N, C, h, w) -> (N, C) -> (N, D)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) images -> (N, D) unit embeddings normalize(g(pool(F(x))))."""
        return self.embed_feature_map(self.feature_map(x))


class ContrastiveModel(nn.Module):
    """Query encoder, its momentum (EMA) copy and the labelled queue.

    Args:
        backbone: the query backbone f (see :class:`Encoder`); the momentum encoder is a copy.
        embed_dim: D, the embedding size (128).
        queue_size: K, the number of queue slots (0 disables the queue).
        hidden_dim: hidden width of g; ``None`` means the backbone's ``out_channels``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int = 128,
        queue_size: int = 8192,
        hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        out_channels = getattr(backbone, "out_channels", None)
        if not isinstance(out_channels, int):
            raise ValueError(
                f"backbone must have an int attribute 'out_channels', got {out_channels!r}"
            )
        head = ProjectionHead(out_channels, embed_dim, hidden_dim)
        self.query_encoder = Encoder(backbone, head)
        self.momentum_encoder = copy.deepcopy(self.query_encoder)
        self.momentum_encoder.requires_grad_(False)
        self.queue = LabelledQueue(queue_size, embed_dim)

    @torch.no_grad()
    def init_momentum_encoder(self) -> None:
        """Copy the query encoder's parameters and buffers into the momentum encoder."""
        self.momentum_encoder.load_state_dict(self.query_encoder.state_dict())

    @torch.no_grad()
    def update_momentum_encoder(self, momentum: float) -> None:
        """EMA step θ_m ← m·θ_m + (1 − m)·θ_q over parameters (MoCo).

        Buffers (batch-norm running statistics) of the momentum encoder are left as they are:
        it keeps its own statistics from the key views, as in MoCo.

        Args:
            momentum: m in [0, 1] (0.999 for ImageNet; passed per step so schedules stay outside).
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        momentum_params = list(self.momentum_encoder.parameters())
        query_params = [p.detach() for p in self.query_encoder.parameters()]
        torch._foreach_mul_(momentum_params, momentum)
        torch._foreach_add_(momentum_params, query_params, alpha=1.0 - momentum)

    @torch.no_grad()
    def follow_and_enqueue(self, momentum: float, keys: Tensor, labels: Tensor) -> None:
        """After an optimizer step: the momentum encoder's EMA step, then ``keys`` (N, D) with
        their ``labels`` (N,) into the queue (MoCo's order)."""
        self.update_momentum_encoder(momentum)
        self.queue.enqueue(keys.detach().float(), labels)

    def forward(
        self,
        query_view: Tensor,
        key_view: Tensor,
        patches: Tensor | None = None,
        boxes: Tensor | None = None,
    ) -> ContrastiveOutput:
        """Compute q, k and, with patches, the PBSD teacher t and student u.

        Args:
            query_view: (B, C_in, H, W) query views x_q.
            key_view: (B, C_in, H', W') key views x_k.
            patches: (B, L, C_in, h, w) patch crops, or None (methods without PBSD).
            boxes: (B, L, 4) patch boxes (x1, y1, x2, y2) in x_q's pixel coordinates, or None.

        Returns:
            :class:`ContrastiveOutput` with query (B, D), key (B, D) without gradient, and
            teacher / student (L, B, D) (None when ``patches`` and ``boxes`` are None).
        """
        # B batch, C channels, D dim, L patches
        self._check_inputs(query_view, key_view, patches, boxes)
        fmap = self.query_encoder.feature_map(query_view)  # (B, C, H/s, W/s)
        query = self.query_encoder.embed_feature_map(fmap)  # (B, D)
        key = self.encode_keys(key_view)  # (B, D)
        if patches is None or boxes is None:
            return ContrastiveOutput(query, key, None, None)
        teacher = self._teacher(fmap, boxes)  # (L, B, D)
        batch, num_patches = patches.shape[:2]
        student = self.query_encoder(patches.flatten(0, 1))  # (B·L, D), row i·L + j
        student = student.view(batch, num_patches, -1).transpose(0, 1)  # (L, B, D)
        return ContrastiveOutput(query, key, teacher, student)

    @torch.no_grad()
    def encode_keys(self, key_view: Tensor) -> Tensor:
        """k = normalize(g_m(pool(F_m(x_k)))): (B, C_in, H, W) -> (B, D), with shuffled batch
        norm across processes when there are several (MoCo), plain otherwise."""
        if dist.get_world_size() > 1:
            shuffled, unshuffle_index = dist.batch_shuffle(key_view)
            return dist.batch_unshuffle(self.momentum_encoder(shuffled), unshuffle_index)
        return self.momentum_encoder(key_view)

    @torch.no_grad()
    def _teacher(self, fmap: Tensor, boxes: Tensor) -> Tensor:
        """t_j = normalize(g(mean over 2×2 RoIAlign of F(x_q) at box j)), stop-gradient.

        Args:
            fmap: (B, C, h, w) query feature map F(x_q) (detached here).
            boxes: (B, L, 4) boxes (x1, y1, x2, y2) in query-view pixels.

        Returns:
            (L, B, D) teacher embeddings without gradient.
        """
        # B batch, C channels, D dim, L patches
        batch, num_patches = boxes.shape[:2]
        # The rois and the map go to RoIAlign in float32 whatever the autocast dtype: the first
        # roi column is the image index, and bf16 holds integers exactly only up to 256 (fp16 up
        # to 2048), so a low-precision index would cut regions from the wrong image.
        image_index = torch.arange(batch, device=fmap.device, dtype=torch.float32)
        image_index = image_index.repeat_interleave(num_patches)  # (B·L,), row i·L + j
        coords = boxes.reshape(-1, 4).to(device=fmap.device, dtype=torch.float32)  # (B·L, 4)
        rois = torch.cat([image_index[:, None], coords], dim=1)  # (B·L, 5)
        regions = roi_align(
            fmap.detach().float(),
            rois,
            output_size=2,
            spatial_scale=1.0 / self.query_encoder.stride,
            sampling_ratio=ROI_SAMPLING_RATIO,
            aligned=True,
        )  # (B·L, C, 2, 2)
        teacher = self.query_encoder.embed_pooled(regions.mean(dim=(2, 3)))  # (B·L, D)
        return teacher.view(batch, num_patches, -1).transpose(0, 1)  # (L, B, D)

    @staticmethod
    def _check_inputs(
        query_view: Tensor, key_view: Tensor, patches: Tensor | None, boxes: Tensor | None
    ) -> None:
        if query_view.ndim != 4:
            raise ValueError(f"query_view must be (B, C, H, W), got {tuple(query_view.shape)}")
        batch = query_view.shape[0]
        if key_view.ndim != 4 or key_view.shape[0] != batch:
            raise ValueError(f"key_view must be ({batch}, C, H, W), got {tuple(key_view.shape)}")
        if (patches is None) != (boxes is None):
            raise ValueError("patches and boxes must be given together or both be None")
        if patches is None or boxes is None:
            return
        if patches.ndim != 5 or patches.shape[0] != batch:
            raise ValueError(f"patches must be ({batch}, L, C, h, w), got {tuple(patches.shape)}")
        if boxes.shape != (batch, patches.shape[1], 4):
            raise ValueError(
                f"boxes must be ({batch}, {patches.shape[1]}, 4), got {tuple(boxes.shape)}"
            )
