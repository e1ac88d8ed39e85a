"""Assembling a stage: stage 1 as `dscl pretrain` and the benchmarks build it, and a stage's
plan."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dscl.config import build_config
from dscl.data.synthetic import make_synthetic
from dscl.data.views import ALL_VIEWS, ViewConfig
from dscl.engine import runtime
from dscl.engine.pretrain import build_stage1, training_only_context
from dscl.engine.stage import StagePlan


def supcon_context(*overrides: str):
    cfg = build_config(None, ["method=supcon", "model.backbone=resnet32", *overrides])
    images = make_synthetic([6, 6, 6, 6], 16, seed=0, stream=0)
    view_cfg = ViewConfig(view_size=16, patch_size=8)
    return training_only_context(cfg, images, view_cfg, torch.device("cpu"), None)


def test_training_only_context_holds_the_training_set_alone():
    ctx = supcon_context()
    assert ctx.splits.num_classes == 4 and ctx.splits.class_counts == [6, 6, 6, 6]
    assert len(ctx.splits.train) == 24 and len(ctx.splits.val) == len(ctx.splits.test) == 0


def test_build_stage1_follows_the_config():
    ctx = supcon_context(
        "pretrain.batch_size=8",
        "pretrain.epochs=3",
        "pretrain.warmup_epochs=1",
        "pretrain.base_lr=0.2",
        "pretrain.momentum=0.8",
        "pretrain.weight_decay=0.001",
    )
    parts = build_stage1(ctx)
    assert parts.feed.steps_per_epoch == 3  # 24 images, 8 a batch
    assert parts.feed.request == parts.method.view_request() != ALL_VIEWS
    expected = runtime.warmup_cosine(0.2 * 8 / 256, 3, 3, 1)
    np.testing.assert_array_equal(parts.opt.lr_at, expected)
    group = parts.opt.optimizer.param_groups[0]
    assert group["momentum"] == 0.8 and group["weight_decay"] == 0.001
    assert parts.opt.memory_format == torch.channels_last  # channels_last=true by default
    conv = next(p for p in parts.method.model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert build_stage1(ctx, all_views=True).feed.request == ALL_VIEWS


def test_all_views_adds_the_standard_views_and_keeps_the_methods_own():
    """A benchmark's every-view feed of a method with views of its own still makes them (a
    method reading them would otherwise miss them: a KeyError in its step)."""
    cfg = build_config(None, ["method=bcl", "model.backbone=resnet32", "pretrain.batch_size=8"])
    images = make_synthetic([6, 6, 6, 6], 16, seed=0, stream=0)
    view_cfg = ViewConfig(view_size=16, patch_size=8)
    ctx = training_only_context(cfg, images, view_cfg, torch.device("cpu"), None)
    parts = build_stage1(ctx, all_views=True)
    own = parts.method.view_request().extra
    assert own and parts.feed.request.extra == own
    assert parts.feed.request.standard == ALL_VIEWS.standard
    parts.method.start_training()
    batch = next(iter(parts.feed.epoch(0)))
    assert set(dict(own)) <= set(batch.inputs) and "patches" in batch.inputs


def test_build_stage1_keeps_the_contiguous_format_when_asked():
    parts = build_stage1(supcon_context("pretrain.batch_size=8", "channels_last=false"))
    assert parts.opt.memory_format == torch.contiguous_format


def test_a_stage_plan_names_its_log_records():
    def plan(label: str) -> StagePlan:
        return StagePlan(label, 1, Path("x.pt"), 0, lambda epoch, val: {})

    assert plan("stage 1").log_stage == "pretrain"
    assert plan("stage 2").log_stage == "classifier"
