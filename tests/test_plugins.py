"""Plugins (``dscl.plugins``): the config key ``plugins`` and the ``dscl.plugins`` entry points,
imported before a config is parsed, in every command and in every cell of a study.

Tests that train import their plugin in a subprocess, as the ``dscl`` command does, so that what
it registers never stays behind in the test process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dscl import plugins
from dscl.cli import main
from dscl.config import build_config, config_to_dict, first_difference, upgrade_saved
from dscl.methods.registry import method_names, unregister_method
from test_readme import EXTENDING, example
from tiny_run import TINY

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")

# a plugin that registers method ``name`` (the cross-entropy method under another name) and
# counts its imports in the file ``count``
COUNTING = """
from pathlib import Path

from dscl.methods import register_method
from dscl.methods.cross_entropy import build_cross_entropy

Path({count!r}).open("a").write("imported\\n")
register_method({name!r}, sections=("ce",))(build_cross_entropy)
"""


def env(*paths: Path | str) -> dict[str, str]:
    """The environment of a ``dscl`` subprocess: this checkout's package, ``paths`` before it."""
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out.pop("DSCL_DEBUG", None)
    out["PYTHONPATH"] = os.pathsep.join([*map(str, paths), SRC])
    return out


def dscl(*args: str, cwd: Path, paths: tuple = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dscl.cli", *args],
        cwd=cwd,
        env=env(*paths),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def forget():
    """Methods named here are unregistered, and file plugins forgotten, after the test."""
    names: list[str] = []
    yield names
    for name in names:
        unregister_method(name)
    for module in [m for m in sys.modules if m.startswith("dscl_plugin_")]:
        del sys.modules[module]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dscl: error: "), err
    assert "Traceback" not in err
    return err


# ---------------------------------------------------------------- the config key


def test_a_file_plugin_is_resolved_imported_once_and_validates(tmp_path, forget, monkeypatch):
    """A relative file is resolved against the config file's folder (a YAML file) or the current
    folder (an override), imported once per process, and what it registers validates."""
    forget.append("plug_once")
    count = tmp_path / "count.txt"
    (tmp_path / "conf").mkdir()
    plugin = tmp_path / "conf" / "once.py"
    plugin.write_text(COUNTING.format(count=str(count), name="plug_once"))
    config = tmp_path / "conf" / "run.yaml"
    config.write_text("plugins: [once.py]\nmethod: plug_once\nce: {label_smoothing: 0.1}\n")
    monkeypatch.chdir(tmp_path)
    cfg = build_config(config)
    assert cfg.plugins == [str(plugin)] and cfg.method == "plug_once"
    assert config_to_dict(cfg)["plugins"] == [str(plugin)]
    again = build_config(None, ["plugins=[conf/once.py]", "method=plug_once"])
    assert again.plugins == [str(plugin)]
    assert count.read_text() == "imported\n"  # once, however often it is named
    assert plugins.module_name(plugin) == plugins.module_name(tmp_path / "conf" / ".." / plugin)
    assert plugins.module_name(plugin) in sys.modules


def test_a_module_plugin_and_the_overrides_plugins_replace_the_files(tmp_path, forget, monkeypatch):
    forget.append("plug_module")
    count = tmp_path / "count.txt"
    (tmp_path / "plug_pkg").mkdir()
    (tmp_path / "plug_pkg" / "__init__.py").write_text("")
    module = tmp_path / "plug_pkg" / "methods.py"
    module.write_text(COUNTING.format(count=str(count), name="plug_module"))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "run.yaml"
    config.write_text("plugins: [missing_plugin.py]\n")
    cfg = build_config(config, ["plugins=[plug_pkg.methods]", "method=plug_module"])
    assert cfg.plugins == ["plug_pkg.methods"]  # module names stay as written
    assert "plug_module" in method_names()
    sys.modules.pop("plug_pkg.methods")
    sys.modules.pop("plug_pkg")


@pytest.mark.parametrize(
    ("plugin", "fragments"),
    [
        ("gone.py", ["plugins: ", "gone.py: plugin file not found"]),
        ("folder.py", ["plugins: ", "folder.py: is not a file"]),
        ("no_such_plugin_module", ["plugins: no_such_plugin_module: module not found"]),
        ("dscl.no_such_part", ["plugins: dscl.no_such_part: module not found"]),
        (
            "raises.py",
            ["raises.py: importing it raised RuntimeError: plugin broke", "raises.py:5)"],
        ),
        (
            "needs.py",
            ["importing it raised ModuleNotFoundError: No module named 'gone_dependency'"],
        ),
        ("syntax.py", ["importing it raised SyntaxError: ", "syntax.py:2)"]),
    ],
)
def test_a_broken_plugin_is_a_one_line_error(tmp_path, capsys, monkeypatch, plugin, fragments):
    """``dscl run`` stops before any work with one line naming the key and the plugin: a file or
    module not found, or what importing it raised and the plugin's line that raised it."""
    (tmp_path / "raises.py").write_text(
        "import json\n\n\ndef broken():\n    raise RuntimeError('plugin broke')\n\n\nbroken()\n"
    )
    (tmp_path / "needs.py").write_text("import gone_dependency\n")
    (tmp_path / "syntax.py").write_text("x = 1\ny = (\n")
    (tmp_path / "folder.py").mkdir()
    monkeypatch.chdir(tmp_path)
    args = ["run", f"output_dir={tmp_path}", f"plugins=[{plugin}]", "method=ce"]
    assert main(args) == 2
    err = one_line_error(capsys)
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "run").exists()  # nothing was started
    assert not [m for m in sys.modules if m.startswith("dscl_plugin_")]


def test_a_broken_plugin_of_a_config_file_names_the_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("plugins: [absent.py]\n")
    assert main(["config", "--config", str(config)]) == 2
    err = one_line_error(capsys)
    assert f"{config}: plugins: {tmp_path / 'absent.py'}: plugin file not found" in err
    config.write_text("plugins: absent.py\n")
    assert main(["config", "--config", str(config)]) == 2
    assert f"{config}: plugins: expected a list" in one_line_error(capsys)


def test_old_configs_without_plugins_read_and_compare_equal():
    """A config saved before the key existed has no plugins, and is the same run; plugins are
    not part of a run's identity (a file moved or written otherwise still resumes)."""
    now = config_to_dict(build_config("fashion_mnist_lt"))
    old = {k: v for k, v in now.items() if k != "plugins"}
    assert upgrade_saved(old)["plugins"] == []
    assert first_difference(old, now, frozenset()) is None  # even when nothing is ignored
    moved = {**now, "plugins": ["/elsewhere/my_methods.py"]}
    assert first_difference(moved, now) is None


# ---------------------------------------------------------------- entry points


def fake_distribution(folder: Path, module: str, body: str) -> None:
    """An installed distribution ``dscl-test-plugin`` in ``folder`` whose entry point of the
    group dscl.plugins is ``module`` (written with ``body``)."""
    info = folder / "dscl_test_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dscl-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[dscl.plugins]\nmy_methods = {module}\n")
    (folder / f"{module}.py").write_text(body)


def test_entry_points_are_loaded_by_every_command_before_the_configs_plugins(tmp_path):
    fake_distribution(tmp_path / "site", "ep_methods", COUNTING.format(count="n", name="ep_ce"))
    # a config plugin that relies on the entry point being imported already
    (tmp_path / "after.py").write_text(
        "from dscl.methods import method_names\n\nassert 'ep_ce' in method_names()\n"
    )
    out = dscl(
        "config", "method=ep_ce", "plugins=[after.py]", cwd=tmp_path, paths=[tmp_path / "site"]
    )
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["method"] == "ep_ce"
    assert (tmp_path / "n").read_text() == "imported\n"
    out = dscl("config", "method=ep_ce", cwd=tmp_path)  # not installed: not known
    assert out.returncode == 2 and "method" in out.stderr


def test_a_failing_entry_point_is_a_one_line_error(tmp_path):
    fake_distribution(tmp_path / "site", "ep_broken", "raise ValueError('no good')\n")
    out = dscl("config", cwd=tmp_path, paths=[tmp_path / "site"])
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "entry point my_methods = ep_broken (distribution dscl-test-plugin 0.1" in out.stderr
    assert "importing it raised ValueError: no good" in out.stderr
    assert f"(at {tmp_path / 'site' / 'ep_broken.py'}:1)" in out.stderr
    (tmp_path / "site" / "ep_broken.py").unlink()
    out = dscl("report", str(tmp_path), cwd=tmp_path, paths=[tmp_path / "site"])
    assert out.returncode == 2 and "module 'ep_broken' not found" in out.stderr, out.stderr


# ---------------------------------------------------------------- runs and studies


@pytest.mark.slow
def test_a_run_with_a_plugin_records_it_and_resumes_however_it_is_written(tmp_path):
    """`dscl run` with a relative plugin from another folder: config.yaml holds it resolved,
    each checkpoint its sha256; the run is the same run with the plugin written otherwise."""
    (tmp_path / "conf").mkdir()
    plugin = tmp_path / "conf" / "my_methods.py"
    plugin.write_text(example(EXTENDING, "method"))
    config = tmp_path / "conf" / "run.yaml"
    config.write_text("plugins: [my_methods.py]\nmethod: focal\nfocal: {gamma: 1.5}\n")
    args = ["run", "--config", str(config), "--name", "r", *TINY, "output_dir=runs"]
    out = dscl(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "runs" / "r"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["plugins"] == [str(plugin)] and saved["focal"] == {"gamma": 1.5}
    digest = hashlib.sha256(plugin.read_bytes()).hexdigest()
    for name in ("pretrain.pt", "best.pt"):
        state = torch.load(run / name, weights_only=True)
        assert state["plugin_sha256"] == {str(plugin): digest}
    assert '"pt":' in (run / "train_log.jsonl").read_text()
    # written relative to the current folder on the command line, or moved: the same run
    (tmp_path / "moved.py").write_text(plugin.read_text())
    for written in ("conf/my_methods.py", "moved.py"):
        again = [a for a in args if a not in ("--config", str(config))]
        again += [f"plugins=[{written}]", "method=focal", "focal.gamma=1.5", "--resume", "auto"]
        out = dscl(*again, cwd=tmp_path)
        assert out.returncode == 0 and "nothing to resume" in out.stderr, out.stderr


def tiny_study(tmp_path: Path, **fields) -> Path:
    """A study of the EXTENDING.md example method (``my_methods.py``) against ce."""
    (tmp_path / "my_methods.py").write_text(example(EXTENDING, "method"))
    overrides = {text.split("=", 1)[0]: yaml.safe_load(text.split("=", 1)[1]) for text in TINY} | {
        "threads": 1,
        "output_dir": str(tmp_path / "runs"),
    }
    data = {
        "name": "plug",
        "base": "fashion_mnist_lt",
        "plugins": ["my_methods.py"],
        "overrides": overrides,
        "axes": {"method": ["focal", "ce"]},
        "results": str(tmp_path / "results" / "plug"),
        **fields,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_study_refuses_plugins_outside_its_own_key(tmp_path, capsys):
    path = tiny_study(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["overrides"]["plugins"] = ["my_methods.py"]
    path.write_text(yaml.safe_dump(data))
    assert main(["study", "--config", str(path)]) == 2
    assert "overrides.plugins: set plugins at the top of the study file" in one_line_error(capsys)
    data["overrides"].pop("plugins")
    data["plugins"] = ["absent.py"]
    path.write_text(yaml.safe_dump(data))
    assert main(["study", "--config", str(path)]) == 2
    err = one_line_error(capsys)
    assert f"{path}: plugins: {tmp_path / 'absent.py'}: plugin file not found" in err


def test_a_slurm_job_of_a_plugin_cell_unpickles_in_a_fresh_process(tmp_path):
    """submitit pickles the cell's job with the study; a fresh process (the job's) that has not
    imported the plugin reads it back, the plugin's settings in the cells' configs included."""
    path = tiny_study(tmp_path, overrides={"focal.gamma": 1.5, "output_dir": str(tmp_path)})
    pack = (
        "import pickle, sys\n"
        "from dscl.study import load_study\n"
        "from dscl.study.launcher import Launcher\n"
        "from dscl.study.slurm_job import CellJob\n"
        "study = load_study(sys.argv[1])\n"
        "job = CellJob(study, study.cells[0].name, sys.argv[2], Launcher(kind='slurm'))\n"
        "open(sys.argv[3], 'wb').write(pickle.dumps(job))\n"
    )
    unpack = (
        "import pickle, sys\n"
        "job = pickle.loads(open(sys.argv[1], 'rb').read())\n"
        "cell = job._cell()\n"
        "print(cell.config.method, cell.config.section('focal').gamma, job.study.plugins)\n"
    )
    job = tmp_path / "job.pkl"
    run = dict(cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    out = subprocess.run([sys.executable, "-c", pack, str(path), str(tmp_path), str(job)], **run)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-c", unpack, str(job)], **run)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["focal", "1.5", f"['{tmp_path / 'my_methods.py'}']"]


@pytest.mark.slow
def test_the_extending_example_as_a_plugin_runs_in_a_study(tmp_path):
    """docs/EXTENDING.md's method as a plugin file named by the study: the study validates its
    grid with it, and each cell's subprocess imports it from the cell's resolved config."""
    path = tiny_study(tmp_path)
    out = dscl("study", "--config", "study.yaml", "--jobs", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    plugin = str(tmp_path / "my_methods.py")
    runs = tmp_path / "runs" / "plug"
    for cell in ("method-focal", "method-ce"):
        assert (runs / cell / "metrics.json").is_file(), cell
        assert (tmp_path / "results" / "plug" / cell / "metrics.json").is_file(), cell
        saved = yaml.safe_load((runs / cell / "config.yaml").read_text())
        assert saved["plugins"] == [plugin]
    saved = yaml.safe_load((runs / "method-focal" / "config.yaml").read_text())
    assert saved["method"] == "focal" and saved["focal"] == {"gamma": 2.0}
    assert '"pt":' in (runs / "method-focal" / "train_log.jsonl").read_text()
    assert '"pt":' not in (runs / "method-ce" / "train_log.jsonl").read_text()
    assert yaml.safe_load((runs / "study.yaml").read_text())["plugins"] == [plugin]
    record = json.loads((runs / "method-focal" / "cell.json").read_text())
    assert f"plugins=[{plugin}]" in record["command"]
    (tmp_path / "elsewhere").mkdir()  # the plugin is found from any folder; nothing is left
    out = dscl("study", "--config", str(path), cwd=tmp_path / "elsewhere")
    assert out.returncode == 0 and "running" not in out.stderr, out.stderr


def test_export_imports_the_plugins_its_checkpoint_names(tmp_path):
    """`dscl export` (as `predict`) has no config of its own: the checkpoint's run named the
    plugin that registers its backbone (docs/EXTENDING.md's tiny_cnn), and export imports it."""
    import runpy

    from dscl.models import build_backbone
    from dscl.models.backbones import _REGISTRY

    plugin = tmp_path / "tiny_cnn.py"
    plugin.write_text(example(EXTENDING, "backbone"))
    try:
        runpy.run_path(str(plugin))
        weights = build_backbone("tiny_cnn").state_dict()
    finally:
        _REGISTRY.remove("tiny_cnn")
    config = {"model": {"backbone": "tiny_cnn"}, "plugins": [str(plugin)]}
    state = {"kind": "pretrain", "config": config, "backbone": weights}
    torch.save(state, tmp_path / "pretrain.pt")
    out = dscl("export", "--checkpoint", "pretrain.pt", "--output", "tiny.pt", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    exported = torch.load(tmp_path / "tiny.pt", weights_only=True)
    assert exported.keys() == weights.keys()
    plugin.unlink()
    out = dscl("export", "--checkpoint", "pretrain.pt", "--output", "tiny.pt", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert f"pretrain.pt: plugins: {plugin}: plugin file not found" in out.stderr


def test_a_moved_plugin_the_checkpoint_does_not_need_is_a_warning(tmp_path):
    """A checkpoint whose method and backbone are built in still exports when a plugin its run
    named has moved since: one warning line, the weights written."""
    from dscl.models import build_backbone

    weights = build_backbone("resnet32").state_dict()
    config = {"model": {"backbone": "resnet32"}, "plugins": [str(tmp_path / "gone.py")]}
    state = {"kind": "pretrain", "method": "ce", "config": config, "backbone": weights}
    torch.save(state, tmp_path / "pretrain.pt")
    out = dscl("export", "--checkpoint", "pretrain.pt", "--output", "r32.pt", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("\n") == 1 and "warning" in out.stderr and "gone.py" in out.stderr
    assert torch.load(tmp_path / "r32.pt", weights_only=True).keys() == weights.keys()
