"""dscl.cli.main: user errors are one line and exit 2, bugs keep their traceback; argument order;
dotted overrides into mapping settings; the process group is destroyed after every command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import yaml

from dscl import cli
from dscl.errors import ConfigError, DataError, SetupError, UserError


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("DSCL_DEBUG", raising=False)


def _replace_command(monkeypatch, name: str, command) -> None:
    monkeypatch.setitem(cli.COMMANDS, name, command)


def _raiser(exc: BaseException):
    def command(args):
        raise exc

    return command


# --- user errors against bugs -------------------------------------------------------------


def test_a_folder_holding_a_run_is_not_replaced_without_overwrite(tmp_path):
    """Any checkpoint (a previous copy included) or a metrics.json is a run to keep:
    ``pretrain`` and ``run`` refuse the folder unless told to continue or replace it."""
    from dscl.errors import RunFolderError

    for name in ("pretrain.pt", "pretrain.prev.pt", "last.pt", "best.pt", "metrics.json"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_bytes(b"")
        with pytest.raises(RunFolderError, match="--overwrite to replace it"):
            cli.prepare_run_dir(folder, overwrite=False, resume=False)
        cli.prepare_run_dir(folder, overwrite=False, resume=True)
        assert (folder / name).exists()
    started = tmp_path / "started"  # a config and a log, nothing saved: started again
    started.mkdir()
    (started / "config.yaml").write_text("seed: 0\n")
    cli.prepare_run_dir(started, overwrite=False, resume=False)


def test_config_error_is_one_line_and_exit_2(capsys):
    assert cli.main(["config", "pretrain.epochs=three"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "dscl: error: pretrain.epochs: expected an integer, got 'three'\n"
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    "error",
    [ConfigError("bad key"), DataError("bad file"), SetupError("no such GPU: cuda:3")],
    ids=lambda e: type(e).__name__,
)
def test_every_user_error_is_one_line_and_exit_2(monkeypatch, capsys, error):
    _replace_command(monkeypatch, "report", _raiser(error))
    assert cli.main(["report", "somewhere"]) == 2
    assert capsys.readouterr().err == f"dscl: error: {error}\n"


def test_setup_error_from_a_bad_environment_is_exit_2(monkeypatch, capsys):
    from dscl import dist

    def command(args):
        dist.init_distributed()
        return 0

    monkeypatch.setenv("WORLD_SIZE", "two")
    _replace_command(monkeypatch, "report", command)
    assert cli.main(["report", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dscl: error: environment variable WORLD_SIZE must be an integer")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "error",
    [
        ValueError("shape mismatch inside a loss"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
        TypeError("forward() got an unexpected keyword"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_bug_is_not_turned_into_a_user_error(monkeypatch, capsys, error):
    _replace_command(monkeypatch, "report", _raiser(error))
    with pytest.raises(type(error)) as raised:
        cli.main(["report", "somewhere"])
    assert raised.value is error
    assert "dscl: error" not in capsys.readouterr().err


def test_debug_reraises_a_user_error(monkeypatch):
    monkeypatch.setenv("DSCL_DEBUG", "1")
    with pytest.raises(ConfigError, match="pretrain.epochs"):
        cli.main(["config", "pretrain.epochs=three"])


def test_floating_point_and_interrupt_keep_their_codes(monkeypatch, capsys):
    _replace_command(monkeypatch, "report", _raiser(FloatingPointError("loss is nan at step 3")))
    assert cli.main(["report", "x"]) == 1
    assert capsys.readouterr().err == "dscl: training stopped: loss is nan at step 3\n"
    _replace_command(monkeypatch, "report", _raiser(KeyboardInterrupt()))
    assert cli.main(["report", "x"]) == 130
    assert capsys.readouterr().err == "dscl: interrupted\n"


def test_a_bug_shows_its_traceback_and_exit_1_from_the_command_line(tmp_path):
    # A real process: a plain ValueError from deep inside keeps its traceback (exit code 1).
    script = (
        "import sys\n"
        "from dscl import cli\n"
        "def broken(args):\n"
        "    raise ValueError('internal shape bug')\n"
        "cli.COMMANDS['report'] = broken\n"
        "sys.exit(cli.main(['report', 'x']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DSCL_DEBUG"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "ValueError: internal shape bug" in done.stderr
    assert "dscl: error" not in done.stderr


def test_user_error_classes_are_value_errors():
    for cls in (ConfigError, DataError, SetupError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)


# --- the process group is destroyed after every command -----------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (lambda args: 0, 0),
        (_raiser(ConfigError("bad")), 2),
        (_raiser(KeyboardInterrupt()), 130),
    ],
    ids=["success", "user-error", "interrupt"],
)
def test_main_cleans_up_after_every_command(monkeypatch, capsys, command, expected):
    from dscl import dist

    calls = []
    monkeypatch.setattr(dist, "cleanup", lambda: calls.append(True))
    _replace_command(monkeypatch, "report", command)
    assert cli.main(["report", "x"]) == expected
    assert calls == [True]


def test_main_cleans_up_after_a_bug(monkeypatch):
    from dscl import dist

    calls = []
    monkeypatch.setattr(dist, "cleanup", lambda: calls.append(True))
    _replace_command(monkeypatch, "report", _raiser(RuntimeError("bug")))
    with pytest.raises(RuntimeError):
        cli.main(["report", "x"])
    assert calls == [True]


def test_main_destroys_a_real_process_group(monkeypatch):
    import torch.distributed as tdist

    from dscl import dist

    if not (tdist.is_available() and tdist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def command(args):
        tdist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )
        assert dist.is_dist_available_and_initialized()
        raise DataError("bad image")  # the group goes even when the command fails

    _replace_command(monkeypatch, "report", command)
    try:
        assert cli.main(["report", "x"]) == 2
        assert not dist.is_dist_available_and_initialized()
    finally:
        dist.cleanup()


# --- options and overrides in any order ---------------------------------------------------


def _printed_config(capsys, argv: list[str]) -> dict:
    assert cli.main(argv) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_config_options_and_overrides_interleave(capsys):
    ordered = _printed_config(
        capsys, ["config", "--config", "fashion_mnist_lt", "--name", "x", "seed=3", "amp=off"]
    )
    mixed = _printed_config(
        capsys, ["config", "seed=3", "--config", "fashion_mnist_lt", "amp=off", "--name", "x"]
    )
    assert mixed == ordered
    assert (ordered["name"], ordered["seed"], ordered["amp"]) == ("x", 3, "off")


@pytest.mark.parametrize(
    ("ordered", "mixed"),
    [
        (
            ["pretrain", "--name", "x", "--overwrite", "seed=1", "pretrain.epochs=2"],
            ["pretrain", "--name", "x", "seed=1", "--overwrite", "pretrain.epochs=2"],
        ),
        (
            ["run", "--resume", "--config", "fashion_mnist_lt", "seed=1", "amp=off"],
            ["run", "seed=1", "--resume", "amp=off", "--config", "fashion_mnist_lt"],
        ),
        (
            ["classify", "--pretrained", "p.pt", "seed=1", "threads=2"],
            ["classify", "seed=1", "--pretrained", "p.pt", "threads=2"],
        ),
        (
            ["evaluate", "--split", "val", "--name", "y", "seed=1", "log_every=5"],
            ["evaluate", "seed=1", "--split", "val", "log_every=5", "--name", "y"],
        ),
    ],
    ids=["pretrain", "run", "classify", "evaluate"],
)
def test_every_override_command_accepts_interleaving(ordered, mixed):
    parser = cli.build_parser()
    parse = cli._normalise_resume  # what main does first: a bare --resume becomes --resume=yes
    ordered_args, mixed_args = parser.parse_args(parse(ordered)), parser.parse_args(parse(mixed))
    assert vars(mixed_args) == vars(ordered_args)
    assert cli.resolve_config(mixed_args) == cli.resolve_config(ordered_args)


def test_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["config", "seed=1", "--bogus", "amp=off"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


# --- dotted overrides into mapping settings -----------------------------------------------


def test_config_command_dotted_key_into_extra(capsys):
    printed = _printed_config(
        capsys, ["config", "data.name=imagenet_lt", "data.extra.train_list=train.txt"]
    )
    assert printed["data"]["extra"] == {"train_list": "train.txt"}
    same = _printed_config(
        capsys, ["config", "data.name=imagenet_lt", "data.extra={train_list: train.txt}"]
    )
    assert same == printed


def test_config_command_dotted_key_adds_to_the_files_extra(tmp_path, capsys):
    path = tmp_path / "own.yaml"
    path.write_text("data:\n  name: imagenet_lt\n  extra:\n    train_list: a.txt\n")
    printed = _printed_config(
        capsys, ["config", "data.extra.val_list=v.txt", "--config", str(path)]
    )
    assert printed["data"]["extra"] == {"train_list": "a.txt", "val_list": "v.txt"}


def test_a_gpu_asked_for_where_there_is_none_is_one_line_and_exit_2(tmp_path, capsys):
    # on a machine with a GPU too: an unmarked test sees none (tests/device_pin.py)
    args = ["run", "--name", "r", f"output_dir={tmp_path}", "device=cuda", "progress=false"]
    args += ["data.name=synthetic_lt", "data.n_max=20", "data.image_size=16"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("dscl: error: device: 'cuda' requested but CUDA is not available here")
    assert err.count("\n") == 1 and "Traceback" not in err
