"""The README's examples run as written."""

import re
import runpy
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_losses_example_runs(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    runpy.run_path(str(script), run_name="__main__")
    values = [float(v) for v in capsys.readouterr().out.split()]
    assert len(values) == 3 and all(v > 0 for v in values)


def test_readme_names_only_shipped_configs():
    """Every `--config X` is a shipped config name, or a path to a file in the repository."""
    shipped = {p.stem for p in (README.parent / "src/dscl/configs").glob("*.yaml")}
    named = set(re.findall(r"--config ([a-z0-9_]+)(?![.\w/])", README.read_text()))
    assert named and named <= shipped, named - shipped
    paths = set(
        re.findall(r"--config ((?:results|configs|src)/[\w./+-]+\.yaml)", README.read_text())
    )
    assert all((README.parent / p).is_file() for p in paths), paths


def test_adding_a_method_example_trains_through_the_cli(tmp_path, monkeypatch):
    """The README's "Adding a method" module, registered as written, runs with `dscl run`."""
    from dscl.cli import main
    from dscl.methods.registry import unregister_method

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (example,) = [b for b in blocks if "register_method" in b]
    script = tmp_path / "focal.py"
    script.write_text(example)
    try:
        runpy.run_path(str(script))
        args = ["run", "--name", "focal", "method=focal", "focal.gamma=1.5"]
        args += [f"output_dir={tmp_path}"]
        args += ["data.name=synthetic_lt", "data.extra={num_classes: 4, image_size: 8}"]
        args += ["data.n_max=16", "data.imbalance_ratio=4", "data.val_per_class=2"]
        args += ["data.image_size=8", "pretrain.epochs=1", "pretrain.batch_size=8"]
        args += ["classifier.epochs=1", "classifier.batch_size=8", "progress=false"]
        assert main(args) == 0
    finally:
        unregister_method("focal")
    log = (tmp_path / "focal" / "train_log.jsonl").read_text()
    assert '"pt":' in log  # the method's own log value reached the training log
    assert (tmp_path / "focal" / "metrics.json").is_file()
    saved = (tmp_path / "focal" / "config.yaml").read_text()
    assert "focal:\n  gamma: 1.5" in saved  # the method's own setting, recorded with the run
