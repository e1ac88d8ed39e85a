"""BCL and PaCo as methods, and what stage 2 does with a method's own classifier
(``classifier.mode``): end to end through ``dscl run`` on the tiny synthetic set, and one step
of each method against its loss computed from the same model's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dscl.checkpoint import load_checkpoint
from dscl.cli import main
from dscl.config import build_config, config_to_dict
from dscl.errors import ConfigError
from dscl.losses import BCLLoss, PaCoLoss
from dscl.methods import DataInfo, build_method, classifier_mode
from tiny_run import tiny

COUNTS = (12, 6, 3)


def _run(tmp_path: Path, name: str, *extra: str) -> Path:
    args = ["run", "--name", name, "threads=1", "progress=false", *tiny(tmp_path), *extra]
    assert main(args) == 0
    return tmp_path / name


@pytest.mark.parametrize("method", ["bcl", "paco"])
def test_one_stage_methods_keep_their_classifier(tmp_path: Path, method: str, capsys):
    run = _run(tmp_path, method, f"method={method}")  # their own views (augment=authors)
    stage1 = load_checkpoint(run / "pretrain.pt")
    best = load_checkpoint(run / "best.pt")
    assert best["classifier_mode"] == "keep" and not (run / "last.pt").exists()
    assert best["model"].keys() == stage1["classifier"].keys()
    for key, value in stage1["classifier"].items():  # the classifier stage 1 ended with
        assert torch.equal(best["model"][key], value), key
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"] == "test" and 0.0 <= metrics["top1"] <= 100.0
    saved = (run / "config.yaml").read_text()
    assert f"\n{method}:\n" in saved and "mode: auto" in saved and "augment: authors" in saved
    # evaluation and export read the same classifier
    assert main(["evaluate", "--name", method, f"output_dir={tmp_path}", "threads=1"]) == 0
    again = json.loads((run / "metrics.json").read_text())
    assert again["top1"] == metrics["top1"]
    # a finished keep run is finished for --resume auto (it has best.pt and no last.pt)
    capsys.readouterr()
    _run(tmp_path, method, f"method={method}", "--resume", "auto")
    assert "the run is finished; nothing to resume" in capsys.readouterr().err
    out = tmp_path / "backbone.pt"
    assert main(["export", "--checkpoint", str(run / "best.pt"), "--output", str(out)]) == 0
    exported = torch.load(out)
    prefix = "classifier.backbone."  # both keep the backbone inside their classifier
    own = {k[len(prefix) :]: v for k, v in stage1["model"].items() if k.startswith(prefix)}
    assert exported.keys() == own.keys()
    assert all(torch.equal(exported[k], own[k]) for k in own)


def test_retrain_starts_from_the_methods_classifier_probe_from_a_new_one(tmp_path: Path):
    zero_lr = ["classifier.base_lr=0", "classifier.epochs=1"]
    retrain = _run(tmp_path, "r", "method=ce", "classifier.mode=retrain", *zero_lr)
    probe = _run(tmp_path, "p", "method=ce", *zero_lr)  # auto: probe for ce, as before
    own = load_checkpoint(retrain / "pretrain.pt")["classifier"]
    r, p = load_checkpoint(retrain / "best.pt"), load_checkpoint(probe / "best.pt")
    assert r["classifier_mode"] == "retrain" and p["classifier_mode"] == "probe"
    assert torch.equal(r["model"]["fc.fc.weight"], own["fc.fc.weight"])  # lr 0: unchanged
    assert not torch.equal(p["model"]["fc.fc.weight"], own["fc.fc.weight"])


def test_classifier_modes_are_checked_against_the_method():
    assert classifier_mode("bcl", "auto") == "keep" and classifier_mode("ce", "auto") == "probe"
    assert classifier_mode("dscl+pbsd", "auto") == "probe"
    for mode in ("keep", "retrain"):
        with pytest.raises(ConfigError, match=f"classifier.mode: {mode} needs a method"):
            build_config(None, ["method=supcon", f"classifier.mode={mode}"])
    with pytest.raises(ConfigError, match="classifier.mode: 'later' is not one of"):
        build_config(None, ["classifier.mode=later"])
    with pytest.raises(ConfigError, match="paco.gamma: must be positive"):
        build_config(None, ["method=paco", "paco.gamma=0"])
    with pytest.raises(ConfigError, match="bcl.scl_weight: must not be negative"):
        build_config(None, ["method=bcl", "bcl.scl_weight=-1"])
    saved = config_to_dict(build_config(None, ["method=paco", "paco.alpha=0.01"]))
    assert saved["paco"]["alpha"] == 0.01 and "bcl" not in saved and "dscl" not in saved


def _data() -> DataInfo:
    return DataInfo(num_classes=3, class_counts=COUNTS, image_size=16, patch_size=4, num_patches=2)


def _batch(n: int = 6, names=("query", "key")):
    g = torch.Generator().manual_seed(0)

    class Batch:
        inputs = {name: torch.randn(n, 3, 16, 16, generator=g) for name in names}
        labels = torch.tensor([0, 0, 1, 2, 0, 1][:n])

    return Batch


@pytest.mark.parametrize("augment", ["stage1", "authors"])
def test_bcl_step_is_its_loss_on_the_models_outputs(augment: str):
    """stage1: logits of the query, contrast of query and key; authors: logits of the
    RandAugment view, contrast of the two SimCLR views, all three through one forward."""
    args = ["method=bcl", "model.backbone=resnet32", "bcl.scl_weight=0.5", f"bcl.augment={augment}"]
    cfg = build_config(None, args)
    torch.manual_seed(0)
    method = build_method(cfg, _data())
    method.model.eval()  # batch norm from its running statistics: repeatable forwards
    names = ["query", "key"] if augment == "stage1" else ["bcl_class", "bcl_view1", "bcl_view2"]
    request = method.view_request()
    if augment == "stage1":
        assert request.standard == ("query", "key") and not request.extra
    else:
        assert request.standard == () and [n for n, _ in request.extra] == names
        assert dict(request.extra)["bcl_class"].randaugment == (2, 10)
    batch = _batch(names=names)
    out = method.step(batch)
    model = method.model
    features = model.classifier.features(torch.cat([batch.inputs[n] for n in names]))
    logits = model.classifier.fc(features[:6])
    z = F.normalize(model.head(features[-12:]), dim=1)
    prototypes = F.normalize(model.prototype_head(model.classifier.fc.fc.weight), dim=1)
    expected = BCLLoss(COUNTS, 0.07, 1.0, 1.0, 0.5)(logits, z[:6], z[6:], batch.labels, prototypes)
    assert torch.allclose(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.logs["loss_bcl"], expected.scl, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="method bcl needs the training class counts"):
        build_method(cfg, 3)


@pytest.mark.parametrize("augment", ["stage1", "authors"])
def test_paco_step_is_its_loss_and_fills_the_queue(augment: str):
    args = ["method=paco", "pretrain.queue_size=16", "paco.alpha=0.1", f"paco.augment={augment}"]
    cfg = build_config(None, args)
    torch.manual_seed(0)
    method = build_method(cfg, _data())
    method.start_training()
    method.model.eval()
    names = ["query", "key"] if augment == "stage1" else ["paco_query", "paco_key"]
    extra = dict(method.view_request().extra)
    assert list(extra) == ([] if augment == "stage1" else names)
    if extra:
        assert extra["paco_query"].randaugment == (2, 10) and extra["paco_key"].randaugment is None
    batch = _batch(names=names)
    out = method.step(batch)
    c = method.model.contrastive
    pooled = c.query_encoder.feature_map(batch.inputs[names[0]]).mean(dim=(2, 3))
    query = c.query_encoder.embed_pooled(pooled)
    key = c.momentum_encoder(batch.inputs[names[1]])
    logits = method.model.classifier.fc(pooled)
    loss = PaCoLoss(COUNTS, temperature=0.2, alpha=0.1, beta=1.0, gamma=1.0)
    queue = c.queue
    expected = loss(query, key, batch.labels, queue.features, queue.labels, logits, queue.valid)
    assert torch.allclose(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert int(queue.valid.sum()) == 0
    method.after_step()
    assert int(queue.valid.sum()) == 6  # the batch's keys entered the queue after the step
    assert method.classifier().backbone is c.query_encoder.backbone  # the centres' backbone


@pytest.mark.parametrize("method", ["bcl", "paco"])
def test_class_prior_moves_with_the_model(method: str):
    # The training loop places a method with Method.to; the loss's class prior must travel
    # with the model, or every step copies it to the device from the host. The meta device
    # stands in for a GPU: whatever is left behind stays on the CPU.
    cfg = build_config(None, [f"method={method}", "model.backbone=resnet32", "model.embed_dim=8"])
    built = build_method(cfg, _data())
    assert built.to(torch.device("meta")) is built
    priors = [name for name, _ in built.loss.named_buffers() if name.endswith("log_prior")]
    assert len(priors) == 1, priors
    for name, tensor in [*built.loss.named_buffers(), *built.model.state_dict().items()]:
        assert tensor.device.type == "meta", name
