"""The ``dscl`` command end to end on a tiny synthetic long-tailed dataset (a few steps each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dscl import runfiles
from dscl.checkpoint import load_checkpoint
from dscl.cli import main
from dscl.config import config_from_dict
from gloo_run import free_port
from tiny_run import TINY, metrics_counts, tiny


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One complete ``dscl run`` that several tests read."""
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "--name", "full", *tiny(out)]) == 0
    return out / "full"


def test_run_writes_every_file(finished_run: Path):
    for name in (
        "config.yaml",
        "metrics.json",
        "train_log.jsonl",
        "pretrain.pt",
        "last.pt",
        "best.pt",
        "report.html",
        "data_summary.json",
    ):
        assert (finished_run / name).is_file(), name
    assert any((finished_run / "tensorboard").iterdir())
    # --overwrite removes what runfiles.RUN_FILES names: it must name every file a run writes
    written = {p.name for p in finished_run.iterdir()} - {runfiles.TENSORBOARD}
    assert written <= set(runfiles.RUN_FILES), written - set(runfiles.RUN_FILES)
    summary = json.loads((finished_run / "data_summary.json").read_text())
    assert summary["train"]["counts"] == metrics_counts(finished_run)
    metrics = json.loads((finished_run / "metrics.json").read_text())
    for key in (
        "top1",
        "top5",
        "many",
        "medium",
        "few",
        "per_class",
        "class_counts",
        "split",
        "epoch",
        "method",
    ):
        assert key in metrics, key
    assert metrics["split"] == "test" and metrics["method"] == "dscl+pbsd"
    assert len(metrics["per_class"]) == 10 and metrics["class_counts"][0] == 40
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 100.0
    # the resolved config is in the folder and in every checkpoint
    saved = config_from_dict(yaml.safe_load((finished_run / "config.yaml").read_text()))
    assert saved.data.n_max == 40 and saved.name == "full"
    for ckpt in ("pretrain.pt", "best.pt"):
        assert load_checkpoint(finished_run / ckpt)["config"]["data"]["n_max"] == 40
    stages = {json.loads(line)["stage"] for line in open(finished_run / "train_log.jsonl")}
    assert stages == {"pretrain", "classifier"}
    html = (finished_run / "report.html").read_text()
    assert "data:image/png;base64," in html and "http://" not in html


def test_forced_single_class_gives_its_share(finished_run: Path, tmp_path: Path, capsys):
    """A classifier that always predicts class 3 scores exactly class 3's share of the test set."""
    state = torch.load(finished_run / "best.pt", weights_only=True)
    weight = next(k for k in state["model"] if k.startswith("fc.") and k.endswith("weight"))
    bias = weight[: -len("weight")] + "bias"
    state["model"][weight].zero_()
    state["model"][bias].zero_()
    state["model"][bias][3] = 1.0
    forced = tmp_path / "forced.pt"
    torch.save(state, forced)
    out = str(finished_run.parent)
    assert (
        main(["evaluate", "--name", "full", "--checkpoint", str(forced), f"output_dir={out}"]) == 0
    )
    metrics = json.loads((finished_run / "metrics.json").read_text())
    n_test = sum(row for row in [sum(r) for r in metrics["confusion"]])
    share = 100.0 * sum(metrics["confusion"][3]) / n_test
    assert metrics["top1"] == pytest.approx(share, abs=1e-9)
    assert share == pytest.approx(10.0)  # the test split is balanced: 10 of 100 images
    assert metrics["per_class"][3] == 100.0
    assert all(acc == 0.0 for c, acc in enumerate(metrics["per_class"]) if c != 3)
    assert "Top-1" in capsys.readouterr().out


def _backbone_tensors(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_stage2_keeps_backbone_frozen(finished_run: Path, tmp_path: Path, bn_mode: str):
    stage1 = load_checkpoint(finished_run / "pretrain.pt")["backbone"]
    args = ["classify", "--name", "frozen", "--pretrained", str(finished_run / "pretrain.pt")]
    assert main([*args, *tiny(tmp_path, f"classifier.bn_mode={bn_mode}")]) == 0
    after = _backbone_tensors(
        load_checkpoint(tmp_path / "frozen" / "last.pt")["model"], "backbone."
    )
    assert after.keys() == stage1.keys()
    params = {k for k in stage1 if k.endswith(("weight", "bias"))}
    stats = {k for k in stage1 if k.endswith(("running_mean", "running_var"))}
    assert params and stats
    for key in params:
        assert torch.equal(after[key], stage1[key]), key
    changed = [k for k in stats if not torch.equal(after[k], stage1[k])]
    if bn_mode == "eval":
        assert changed == []
    else:  # the balanced stream re-estimates the statistics
        assert changed


def test_report_predict_export(finished_run: Path, tmp_path: Path, capsys):
    (finished_run / "report.html").unlink()
    assert main(["report", str(finished_run)]) == 0
    assert (finished_run / "report.html").is_file()

    from dscl.data import build_splits

    splits = build_splits(
        "synthetic_lt",
        n_max=40,
        imbalance_ratio=10,
        val_per_class=4,
        image_size=16,
        test_per_class=10,
    )
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in (0, 55):
        image, _ = splits.test[i]
        image.save(folder / f"img{i}.png")
    capsys.readouterr()
    assert (
        main(["predict", "--checkpoint", str(finished_run / "best.pt"), "--topk", "3", str(folder)])
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        path, ranked = line.split("\t")
        assert Path(path).suffix == ".png" and len(ranked.split(", ")) == 3
        assert all(item.split()[0] in splits.class_names for item in ranked.split(", "))

    exported = tmp_path / "backbone.pt"
    assert (
        main(["export", "--checkpoint", str(finished_run / "best.pt"), "--output", str(exported)])
        == 0
    )
    from dscl.models import build_backbone

    build_backbone("resnet32").load_state_dict(torch.load(exported, weights_only=True))


def test_export_loads_into_torchvision(tmp_path: Path):
    import torchvision

    args = [
        "pretrain",
        "--name",
        "r18",
        *tiny(tmp_path, "model.backbone=resnet18", "method=dscl", "data.image_size=32"),
    ]
    assert main(args) == 0
    exported = tmp_path / "r18.pt"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "r18" / "pretrain.pt"),
                "--output",
                str(exported),
            ]
        )
        == 0
    )
    result = torchvision.models.resnet18().load_state_dict(
        torch.load(exported, weights_only=True), strict=False
    )
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []


def test_config_command(capsys):
    assert main(["config", "--config", "fashion_mnist_lt", "pretrain.epochs=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["pretrain"]["epochs"] == 3 and printed["data"]["name"] == "fashion_mnist_lt"


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dscl: error:"), err
    return lines[0]


def test_error_paths(finished_run: Path, tmp_path: Path, capsys):
    out = str(finished_run.parent)
    assert "pretrain.epoch: unknown key" in _error(
        capsys, ["pretrain", *tiny(tmp_path), "pretrain.epoch=2"]
    )
    assert "pretrain.epochs: expected an integer" in _error(
        capsys, ["pretrain", *tiny(tmp_path), "pretrain.epochs=two"]
    )
    missing = tmp_path / "no-such-folder"
    msg = _error(
        capsys,
        [
            "pretrain",
            *tiny(tmp_path),
            "data.name=fashion_mnist_lt",
            "data.extra={}",
            f"data.root={missing}",
        ],
    )
    assert str(missing) in msg
    # a stage-1 checkpoint of another architecture or method
    stage1 = str(finished_run / "pretrain.pt")
    msg = _error(
        capsys,
        [
            "classify",
            "--name",
            "x",
            "--pretrained",
            stage1,
            *tiny(tmp_path, "model.backbone=resnet18"),
        ],
    )
    assert "model.backbone" in msg and "resnet18" in msg
    msg = _error(
        capsys,
        ["classify", "--name", "x", "--pretrained", stage1, *tiny(tmp_path, "method=supcon")],
    )
    assert "method" in msg and "supcon" in msg
    # an unwritable run folder: its parent is a file
    blocker = tmp_path / "file"
    blocker.write_text("")
    msg = _error(capsys, ["pretrain", "--name", "x", *tiny(tmp_path), f"output_dir={blocker}"])
    assert "not writable" in msg
    # a finished run is not overwritten without --overwrite
    before = (finished_run / "metrics.json").read_bytes()
    msg = _error(capsys, ["run", "--name", "full", *TINY, f"output_dir={out}"])
    assert "--overwrite" in msg
    assert (finished_run / "metrics.json").read_bytes() == before
    # nothing was trained for any of these
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").glob("*.pt"))


def test_resume_is_exact(tmp_path: Path, monkeypatch):
    """Stopping after epoch 1 and resuming gives the same weights as an uninterrupted run."""
    args = tiny(tmp_path, "pretrain.epochs=2")
    assert main(["pretrain", "--name", "straight", *args]) == 0

    from dscl.engine import feed

    original = feed.TrainFeed.epoch

    def interrupted(self, epoch, *args):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch, *args)

    monkeypatch.setattr(feed.TrainFeed, "epoch", interrupted)
    assert main(["pretrain", "--name", "resumed", *args]) == 130
    assert load_checkpoint(tmp_path / "resumed" / "pretrain.pt")["epoch"] == 0
    monkeypatch.setattr(feed.TrainFeed, "epoch", original)
    assert main(["pretrain", "--name", "resumed", "--resume", *args]) == 0
    a = load_checkpoint(tmp_path / "straight" / "pretrain.pt")
    b = load_checkpoint(tmp_path / "resumed" / "pretrain.pt")
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_torchrun_two_processes(tmp_path: Path):
    """torchrun with two CPU processes (gloo) runs both stages and the kNN monitor (both ranks
    call it: it gathers); rank 0 alone writes and logs."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "dscl.cli",
        "run",
        "--name",
        "ddp",
        *tiny(tmp_path),
        "progress=false",
        "pretrain.knn_every=1",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "ddp").glob("*.pt") if ".prev." not in p.name)
    assert checkpoints == ["best.pt", "last.pt", "pretrain.pt"]
    state = load_checkpoint(tmp_path / "ddp" / "pretrain.pt")
    assert state["finished"] and state["model"]["queue.valid"].sum() > 0
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["num_samples"] == 100  # every test image once, not once per rank
    records = [json.loads(line) for line in open(tmp_path / "ddp" / "train_log.jsonl")]
    keys = [(r["stage"], r["step"], "val_top1" in r, "val_knn_top1" in r) for r in records]
    assert len(keys) == len(set(keys)) > 0  # each step logged once: only rank 0 logs
    assert [r["epoch"] for r in records if "val_knn_top1" in r] == [0]  # one epoch, logged once
    assert done.stdout.count("Top-1") == 1  # one table, from rank 0


FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST (Debian package dataset-fashion-mnist) is not installed",
)
def test_demo_config_runs_on_real_data(tmp_path: Path):
    """`make demo`'s config file and data path, shrunk to a few steps."""
    top = Path(__file__).resolve().parents[1]
    config = top / "configs" / "fashion_mnist_lt.yaml"
    small = [
        "data.n_max=256",
        "pretrain.epochs=1",
        "classifier.epochs=1",
        "classifier.milestones=[]",
        f"output_dir={tmp_path}",
        "progress=false",
    ]
    assert main(["run", "--config", str(config), "--name", "demo", *small]) == 0
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["num_samples"] == 10_000 and metrics["class_counts"][0] == 256


def test_evaluate_rejects_a_checkpoint_of_another_method(finished_run: Path, capsys):
    out = str(finished_run.parent)
    msg = _error(capsys, ["evaluate", "--name", "full", f"output_dir={out}", "method=dscl"])
    assert "best.pt" in msg and "method" in msg


def test_resume_refuses_a_changed_config(finished_run: Path, capsys):
    out = str(finished_run.parent)
    argv = ["pretrain", "--name", "full", "--resume", *TINY, f"output_dir={out}"]
    msg = _error(capsys, [*argv, "pretrain.epochs=5"])
    assert "pretrain.epochs" in msg and "pretrain.pt" in msg


@pytest.mark.parametrize("file_views", ["fast", "per_sample"])
def test_image_folder_through_dataloader_workers(tmp_path: Path, file_views: str):
    """Both paths of file datasets such as ImageNet-LT through DataLoader workers, end to end on
    a small image folder: the fast path (the default: decode and crop in the workers, colour ops
    batched in the main process) and the per-sample path (the whole transform per image)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, counts in (("train", (16, 8, 4)), ("test", (3, 3, 3))):
        for c, n in enumerate(counts):
            folder = tmp_path / "images" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (20, 20, 3)) + 60 * c
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    args = [
        "data.name=image_folder",
        f"data.root={tmp_path / 'images'}",
        "data.val_per_class=1",
        "data.image_size=16",
        "data.batched_views=false",
        "data.num_workers=1",
        f"data.file_views={file_views}",
        "data.many_threshold=10",
        "data.few_threshold=5",
        "pretrain.epochs=1",
        "pretrain.batch_size=8",
        "pretrain.queue_size=16",
        "classifier.epochs=1",
        "classifier.batch_size=8",
        f"output_dir={tmp_path}",
        "progress=false",
    ]
    assert main(["run", "--name", "folder", *args]) == 0
    metrics = json.loads((tmp_path / "folder" / "metrics.json").read_text())
    assert metrics["class_counts"] == [15, 7, 3]  # one image per class carved for validation
    assert metrics["num_samples"] == 9 and metrics["group_sizes"] == {
        "many": 1,
        "medium": 1,
        "few": 1,
    }


def test_predict_decodes_as_training_does(finished_run: Path, tmp_path: Path, monkeypatch):
    """A 16-bit image is scaled as to_rgb scales it (value / 257), not as PIL's convert("RGB")
    clips it, so prediction sees the pixels training saw: predict reads through load_rgb."""
    import numpy as np
    from PIL import Image

    import dscl.predict as predict_module
    from dscl.data.imagesets import load_rgb

    path = tmp_path / "deep.png"
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(path)
    pixels = np.asarray(load_rgb(str(path)))
    assert pixels.dtype == np.uint8 and pixels[7, 7, 0] == round(63000 / 257)
    seen = []
    monkeypatch.setattr(predict_module, "load_rgb", lambda p: seen.append(p) or load_rgb(p))
    [(file, top)] = list(predict_module.predict_paths(finished_run / "best.pt", [path], topk=2))
    assert file == path and seen == [str(path)] and len(top) == 2
