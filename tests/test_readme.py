"""The README's and docs/'s examples run as written, and what they name exists."""

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
USAGE = ROOT / "docs" / "USAGE.md"
EXTENDING = ROOT / "docs" / "EXTENDING.md"
DEVICES = ROOT / "docs" / "DEVICES.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

# What each python example is recognised by; every example must be one of these (and so tested).
EXAMPLES = {"losses": "DSCLLoss(", "method": "register_method(", "backbone": "register_backbone("}


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def example(path: Path, kind: str) -> str:
    """The one python block of ``path`` that is the ``kind`` example."""
    blocks = [b for b in python_blocks(path) if EXAMPLES[kind] in b]
    assert len(blocks) == 1, f"{path.name}: {len(blocks)} {kind} examples"
    return blocks[0]


def test_every_python_example_is_one_that_is_tested():
    for path in DOCS:
        for block in python_blocks(path):
            kinds = [k for k, marker in EXAMPLES.items() if marker in block]
            assert len(kinds) == 1, f"{path.name}: an untested python example:\n{block[:200]}"


def test_losses_example_runs(tmp_path, capsys):
    script = tmp_path / "example.py"
    script.write_text(example(USAGE, "losses"))
    runpy.run_path(str(script), run_name="__main__")
    values = [float(v) for v in capsys.readouterr().out.split()]
    assert len(values) == 3 and all(v > 0 for v in values)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_docs_name_only_shipped_configs(path):
    """Every `--config X` is a shipped config name, or a path to a file in the repository."""
    shipped = {p.stem for p in (ROOT / "src/dscl/configs").glob("*.yaml")}
    text = path.read_text()
    named = set(re.findall(r"--config\s+([a-z0-9_]+)(?![.\w/])", text))
    assert named <= shipped, named - shipped
    paths = set(re.findall(r"--config\s+((?:results|configs|src)/[\w./+-]+\.yaml)", text))
    assert all((ROOT / p).is_file() for p in paths), paths


def test_the_readme_and_usage_name_shipped_configs():
    """The check above has something to check where the commands are."""
    for path in (README, USAGE):
        assert re.search(r"--config\s+[a-z0-9_]+(?![.\w/])", path.read_text()), path.name


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file (code blocks skipped)."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_heading_anchors_follow_github():
    assert {"3-architecture", "214-bcl-a-peer-bcl-methodsbclpy-lossesbclpy"} <= heading_anchors(
        ROOT / "docs" / "DESIGN.md"
    )


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    """Every relative link names a file or folder of the repository, and its anchor a heading."""
    broken = []
    for link in relative_links(path):
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(link)
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
            broken.append(link)
    assert not broken, f"{path.name}: {broken}"


def test_the_gpu_check_table_names_cuda_tests_that_exist():
    """Each test the GPU-check table names is a `cuda`-marked test of the suite."""
    table = DEVICES.read_text().split("## The GPU check", 1)[1]
    named = re.findall(r"^\| `(test_\w+\.py)::(test_\w+)(?:\[\w+\])?` \|", table, flags=re.M)
    assert len(named) >= 7
    for file, test in named:
        (source,) = [p.read_text() for p in (ROOT / "tests").rglob(file)]
        assert f"def {test}(" in source, (file, test)
        decorators = source.split(f"def {test}(")[0].rsplit("\n\n", 1)[-1]
        assert "mark.cuda" in decorators, (file, test)


def test_readme_reads_in_five_minutes():
    assert len(README.read_bytes()) <= 12_000


def _tiny_run_args(tmp_path, name):
    args = ["run", "--name", name, f"output_dir={tmp_path}", "progress=false"]
    args += ["data.name=synthetic_lt", "data.extra={num_classes: 4, image_size: 8}"]
    args += ["data.n_max=16", "data.imbalance_ratio=4", "data.val_per_class=2"]
    args += ["data.image_size=8", "pretrain.epochs=1", "pretrain.batch_size=8"]
    args += ["classifier.epochs=1", "classifier.batch_size=8"]
    return args


def test_adding_a_method_example_trains_through_the_cli(tmp_path):
    """docs/EXTENDING.md's method, registered as written, runs with `dscl run`."""
    from dscl.cli import main
    from dscl.config import build_config
    from dscl.methods import build_method
    from dscl.methods.registry import unregister_method

    script = tmp_path / "focal.py"
    script.write_text(example(EXTENDING, "method"))
    try:
        runpy.run_path(str(script))
        # its backbone is the config's: model.zero_init_residual reaches it
        cfg = build_config(None, ["method=focal", "model.zero_init_residual=true"])
        block = build_method(cfg, 3).backbone().layer1[0]
        assert not block.bn2.weight.any()
        args = [*_tiny_run_args(tmp_path, "focal"), "method=focal", "focal.gamma=1.5"]
        assert main(args) == 0
    finally:
        unregister_method("focal")
    log = (tmp_path / "focal" / "train_log.jsonl").read_text()
    assert '"pt":' in log  # the method's own log value reached the training log
    assert (tmp_path / "focal" / "metrics.json").is_file()
    saved = (tmp_path / "focal" / "config.yaml").read_text()
    assert "focal:\n  gamma: 1.5" in saved  # the method's own setting, recorded with the run


def test_adding_a_backbone_example_trains_through_the_cli(tmp_path):
    """docs/EXTENDING.md's backbone, registered as written, trains DSCL+PBSD with `dscl run`."""
    from dscl.cli import main
    from dscl.models.backbones import _REGISTRY

    script = tmp_path / "tiny_cnn.py"
    script.write_text(example(EXTENDING, "backbone"))
    try:
        runpy.run_path(str(script))
        args = [*_tiny_run_args(tmp_path, "tiny"), "model.backbone=tiny_cnn", "method=dscl+pbsd"]
        assert main([*args, "pretrain.queue_size=16", "data.patch_size=4"]) == 0
    finally:
        _REGISTRY.remove("tiny_cnn")
    assert "backbone: tiny_cnn" in (tmp_path / "tiny" / "config.yaml").read_text()
    assert (tmp_path / "tiny" / "metrics.json").is_file()
