"""A method is one record (MethodSpec): registering, looking up and removing it, the settings its
section gained since old runs, and the settings that shape its stage-1 checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from dscl.checkpoint import read_stage1, save_checkpoint
from dscl.config import build_config, config_to_dict, first_difference, upgrade_saved
from dscl.errors import CheckpointError
from dscl.methods import (
    ClassifierSpec,
    MethodSpec,
    classifier_mode,
    method_names,
    method_sections,
    method_spec,
    register,
    register_method,
    section_names,
    unregister_method,
)


@dataclass
class WideSettings:  # section "wide"
    width: int = 4
    extra: bool = True  # added after runs of it were written, which ran without it


def _build(cfg, data):
    raise AssertionError("not built in these tests")


@pytest.fixture
def wide():
    """A method with a section of its own, a shared section, an added setting, a checkpoint key
    of its own section and a classifier."""
    spec = MethodSpec(
        "wide",
        _build,
        WideSettings,
        sections=("dscl",),
        added={"extra": False},
        checkpoint_keys=("wide.width", "model.embed_dim"),
        classifier=ClassifierSpec(auto="probe"),
    )
    register(spec)
    yield spec
    unregister_method("wide")


def test_the_shipped_methods_keep_their_order_and_records():
    assert method_names() == ["ce", "supcon", "dscl", "supcon+pbsd", "dscl+pbsd", "bcl", "paco"]
    assert section_names() == ["ce", "dscl", "pbsd", "bcl", "paco"]
    assert method_sections("dscl+pbsd") == ("dscl", "pbsd") and method_sections("ce") == ("ce",)
    queue = ("model.embed_dim", "pretrain.queue_size")
    assert all(method_spec(m).checkpoint_keys == queue for m in ("supcon", "dscl+pbsd", "paco"))
    assert method_spec("bcl").checkpoint_keys == ("model.embed_dim",)
    assert method_spec("ce").checkpoint_keys == ()
    assert [method_spec(m).classifier.auto for m in ("ce", "bcl", "paco")] == [
        "probe",
        "keep",
        "keep",
    ]
    assert method_spec("dscl").classifier is None
    assert method_spec("bcl").added == {
        "augment": "stage1",
        "randaugment_ops": 2,
        "randaugment_magnitude": 10,
    }


def test_a_method_is_one_record_registered_and_removed_whole(wide):
    assert method_spec("wide") is wide and method_names()[-1] == "wide"
    assert method_sections("wide") == ("wide", "dscl") and "wide" in section_names()
    assert classifier_mode("wide", "auto") == "probe" and classifier_mode("wide", "keep") == "keep"
    assert register(wide) is wide  # the same record again changes nothing
    with pytest.raises(ValueError, match="'wide' is registered already"):
        register_method("wide")(lambda cfg, data: None)
    unregister_method("wide")
    assert "wide" not in method_names() and "wide" not in section_names()
    assert method_sections("wide") == ()
    register(wide)  # the fixture removes it again


def test_a_spec_names_only_real_settings_and_registered_sections():
    with pytest.raises(ValueError, match="added setting 'nope' is not a setting"):
        register(MethodSpec("bad", _build, WideSettings, added={"nope": 1}))
    with pytest.raises(ValueError, match="added settings need settings of its own"):
        register(MethodSpec("bad", _build, added={"width": 1}))
    with pytest.raises(ValueError, match="settings section 'nope' is not registered"):
        register(MethodSpec("bad", _build, sections=("nope",)))
    with pytest.raises(ValueError, match="classifier must be None, 'keep' or 'probe'"):
        register_method("bad", classifier="later")
    assert "bad" not in method_names()


def test_a_setting_added_to_a_methods_section_upgrades_its_old_runs(wide):
    now = config_to_dict(build_config(None, ["method=wide", "wide.extra=false"]))
    old = {**now, "wide": {"width": 4}}
    assert upgrade_saved(old)["wide"] == {"width": 4, "extra": False}
    assert first_difference(old, now) is None
    default = config_to_dict(build_config(None, ["method=wide"]))
    assert first_difference(old, default) == ("wide.extra", False, True)


def _stage1(path: Path, *overrides: str) -> Path:
    cfg = build_config(None, list(overrides))
    save_checkpoint({"kind": "pretrain", "config": config_to_dict(cfg)}, path)
    return path


@pytest.mark.parametrize("method", ["supcon", "dscl+pbsd", "paco"])
def test_resuming_checks_the_queue_and_head_of_the_methods_that_have_them(tmp_path, method):
    path = _stage1(tmp_path / "pretrain.pt", f"method={method}", "pretrain.queue_size=64")
    assert read_stage1(path, build_config(None, [f"method={method}", "pretrain.queue_size=64"]))
    for key, value, saved in (("pretrain.queue_size", 32, 64), ("model.embed_dim", 8, 128)):
        cfg = build_config(None, [f"method={method}", "pretrain.queue_size=64", f"{key}={value}"])
        with pytest.raises(CheckpointError) as err:
            read_stage1(path, cfg, resume=True)
        assert str(err.value) == (
            f"{path}: checkpoint has {key}={saved!r} but this run uses {key}={value!r}"
        )
        read_stage1(path, cfg)  # stage 2 reads only the backbone


def test_resuming_checks_the_generic_keys_for_every_method(tmp_path):
    path = _stage1(tmp_path / "pretrain.pt", "method=ce")
    for override, message in (
        ("method=supcon", "checkpoint has method='ce' but this run uses method='supcon'"),
        ("model.backbone=resnet18", "model.backbone='resnet32' but this run uses"),
        ("pretrain.epochs=3", "checkpoint has pretrain.epochs=200 but this run uses"),
        ("pretrain.batch_size=8", "checkpoint has pretrain.batch_size=256 but this run uses"),
    ):
        with pytest.raises(CheckpointError, match=message):
            read_stage1(path, build_config(None, ["method=ce", override]), resume=True)
    # ce has neither queue nor projection head: their settings do not shape its checkpoint
    cfg = build_config(None, ["method=ce", "pretrain.queue_size=32", "model.embed_dim=8"])
    assert read_stage1(path, cfg, resume=True)["kind"] == "pretrain"


def test_a_method_adds_its_own_checkpoint_keys(tmp_path, wide):
    path = _stage1(tmp_path / "pretrain.pt", "method=wide")
    with pytest.raises(CheckpointError, match="checkpoint has wide.width=4 but this run uses"):
        read_stage1(path, build_config(None, ["method=wide", "wide.width=5"]), resume=True)
    with pytest.raises(CheckpointError, match="checkpoint has model.embed_dim=128 but"):
        read_stage1(path, build_config(None, ["method=wide", "model.embed_dim=8"]), resume=True)


def test_a_checkpoint_from_before_a_setting_existed_is_read_with_its_old_value(tmp_path):
    """A bcl checkpoint saved before ``bcl.augment`` existed fits a run with ``augment=stage1``
    (the checkpoint's config is upgraded as a run folder's is)."""
    cfg = build_config(None, ["method=bcl", "bcl.augment=stage1"])
    saved = config_to_dict(cfg)
    del saved["bcl"]["augment"], saved["model"]["zero_init_residual"]
    path = tmp_path / "old.pt"
    save_checkpoint({"kind": "pretrain", "config": saved}, path)
    assert read_stage1(path, cfg, resume=True)["kind"] == "pretrain"
