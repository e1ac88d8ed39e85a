"""Config: defaults <- YAML <- overrides, strict keys and types, errors naming the key."""

from pathlib import Path

import pytest
import yaml

from dscl.config import (
    AMP_MODES,
    BN_MODES,
    FILE_VIEWS,
    VAL_SHORTFALL,
    ConfigError,
    DataConfig,
    FeedSettings,
    RunConfig,
    build_config,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    parse_override,
)

CONFIGS = Path(__file__).resolve().parents[1] / "src/dscl/configs"
SHIPPED = sorted(p for p in CONFIGS.glob("*.yaml") if not p.stem.startswith("study_"))


def test_defaults_are_the_papers_settings():
    cfg = RunConfig()
    assert cfg.method == "dscl+pbsd"
    p = cfg.pretrain
    assert (p.temperature, p.encoder_momentum) == (0.07, 0.999)
    assert cfg.section("dscl").beta == 8.0 and cfg.section("pbsd").weight == 1.5
    assert (p.momentum, p.weight_decay, p.base_lr, p.warmup_epochs) == (0.9, 5e-4, 0.1, 10)
    assert cfg.classifier.milestones == [20, 30] and cfg.classifier.base_lr == 10.0
    assert cfg.data.num_patches == 5 and cfg.model.embed_dim == 128


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: dscl\npretrain:\n  epochs: 7\ndscl:\n  beta: 2\n")
    cfg = build_config(path, ["pretrain.epochs=3", "data.mean=[0.1, 0.2, 0.3]", "name=x"])
    assert cfg.method == "dscl"
    assert cfg.pretrain.epochs == 3  # the command line wins over the file
    assert cfg.section("dscl").beta == 2.0 and isinstance(cfg.section("dscl").beta, float)
    assert cfg.data.mean == [0.1, 0.2, 0.3] and cfg.name == "x"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("pretrain.epoch=3", "pretrain.epoch: unknown key"),
        ("nonsense=1", "nonsense: unknown key"),
        ("pretrain.epochs=three", "pretrain.epochs: expected an integer"),
        ("pretrain.epochs=2.5", "pretrain.epochs: expected an integer"),
        ("channels_last=maybe", "channels_last: expected true or false"),
        ("dscl.beta=-1", "dscl.beta: must not be negative"),
        ("pbsd.weight=-1", "pbsd.weight: must not be negative"),
        ("dscl.bta=1", "dscl.bta: unknown key (known keys here: beta)"),
        ("pretrain.beta=2", "pretrain.beta: this setting moved to dscl.beta"),
        ("pretrain.pbsd_weight=2", "pretrain.pbsd_weight: this setting moved to pbsd.weight"),
        ("pretrain.label_smoothing=0.1", "moved to ce.label_smoothing"),
        ("pretrain.temperature=0", "pretrain.temperature: must be positive"),
        ("method=focal", "method: 'focal' is not one of"),
        ("classifier.bn_mode=frozen", "classifier.bn_mode"),
        ("data.val_shortfall=skip", "data.val_shortfall"),
        ("data=3", "data: expected a mapping"),
        ("data.crop_scale=[0.5, 0.2]", "data.crop_scale: need [low, high]"),
        ("data.patch_scale=[0.1]", "data.patch_scale: need [low, high]"),
        ("pretrain.epochs", "expected key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as err:
        build_config(None, [override])
    assert needle in str(err.value)


def test_bad_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  backbon: resnet32\n")
    with pytest.raises(ConfigError) as err:
        build_config(path)
    assert str(path) in str(err.value) and "model.backbon: unknown key" in str(err.value)
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        build_config(tmp_path / "list.yaml")


@pytest.mark.parametrize(
    ("key", "choices"),
    [
        ("classifier.bn_mode", BN_MODES),
        ("data.val_shortfall", VAL_SHORTFALL),
        ("data.file_views", FILE_VIEWS),
        ("amp", AMP_MODES),
    ],
)
def test_a_choice_setting_takes_exactly_the_values_of_its_constant(key, choices):
    for value in choices:
        build_config(None, [f"{key}={value}"])
    with pytest.raises(ConfigError) as err:
        build_config(None, [f"{key}=other"])
    assert str(err.value) == f"{key}: 'other' is not one of {', '.join(choices)}"


def test_feed_settings_carry_the_data_settings():
    data = DataConfig(
        num_workers=3, batched_views=False, file_views="per_sample", decode_on_device=True
    )
    data.jpeg_draft = 64  # each field away from its default (the combination is not checked)
    assert data.feed_settings() == FeedSettings(
        num_workers=3, in_memory=False, file_views="per_sample", jpeg_draft=64,
        decode_on_device=True,
    )  # fmt: skip
    assert DataConfig().feed_settings() == FeedSettings()
    with pytest.raises(ValueError, match="^file_views: 'fastest' is not one of fast, per_sample$"):
        FeedSettings(file_views="fastest")


def test_round_trip_through_dict_and_yaml():
    cfg = build_config(None, ["pretrain.epochs=5", "data.root=/x", "data.extra={a: 1}"])
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg


def test_parse_override_types():
    assert parse_override("a.b=1")["a"]["b"].parsed == 1
    assert parse_override("a=null")["a"].parsed is None
    assert parse_override("a=")["a"].parsed is None
    assert parse_override("amp=off")["amp"] == ("off", False)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    from dscl.data import DATASETS
    from dscl.models import list_backbones

    cfg = build_config(path)
    assert cfg.data.name in DATASETS and cfg.model.backbone in list_backbones()
    by_name = build_config(path.stem)  # shipped configs resolve by name too
    assert by_name == cfg


def test_shipped_configs_exist():
    names = {p.stem for p in SHIPPED}
    expected = {
        "fashion_mnist_lt",
        "cifar10_lt",
        "cifar100_lt",
        "cifar100_lt_ir50",
        "cifar100_lt_ir10",
        "imagenet_lt_r50",
        "imagenet_lt_x50",
        "places_lt",
        "inat2018",
    }
    assert expected <= names


def test_string_settings_keep_the_text_as_typed():
    # YAML would read these as booleans / numbers; a string setting keeps what was typed.
    cfg = build_config(None, ["amp=off", "name=123", "data.root=null", "device=cpu"])
    assert cfg.amp == "off" and cfg.name == "123" and cfg.data.root is None
    with pytest.raises(ConfigError, match="quote it"):
        config_from_dict({"amp": False})


def test_configs_folder_at_the_top_holds_the_shipped_configs():
    top = Path(__file__).resolve().parents[1] / "configs"
    assert (top / "fashion_mnist_lt.yaml").is_file()  # the path `make demo` uses
    assert build_config(top / "fashion_mnist_lt.yaml") == build_config("fashion_mnist_lt")


def test_missing_file_is_named_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_config(tmp_path / "nope.yaml")
    assert str(err.value).count("nope.yaml") == 1


def test_dotted_keys_into_a_mapping_setting_give_plain_values():
    cfg = build_config(
        None,
        [
            "data.name=imagenet_lt",
            "data.extra.train_list=train.txt",
            "data.extra.num_classes=7",
            "data.extra.sub.flag=off",
        ],
    )
    # what YAML reads, as in data.extra={...}; no internal override object is left in the mapping
    assert cfg.data.extra == {"train_list": "train.txt", "num_classes": 7, "sub": {"flag": False}}
    assert type(cfg.data.extra["train_list"]) is str
    assert config_from_dict(yaml.safe_load(config_to_yaml(cfg))) == cfg  # dumps as plain YAML


def test_mapping_setting_merges_dotted_keys_and_a_typed_mapping_replaces(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  extra:\n    train_list: a.txt\n    list_dir: /lists\n")
    cfg = build_config(path, ["data.extra.val_list=v.txt"])
    assert cfg.data.extra == {"train_list": "a.txt", "list_dir": "/lists", "val_list": "v.txt"}
    # a dotted key adds to what is there; a whole mapping typed on the command line replaces it
    cfg = build_config(path, ["data.extra={train_list: b.txt}", "data.extra.test_list=t.txt"])
    assert cfg.data.extra == {"train_list": "b.txt", "test_list": "t.txt"}
    cfg = build_config(path, ["data.extra.test_list=t.txt", "data.extra={list_dir: /l2}"])
    assert cfg.data.extra == {"list_dir": "/l2"}
    assert build_config(path, ["data.extra={}"]).data.extra == {}
    assert RunConfig().data.extra == {}  # the default mapping is not shared or changed


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("pretrain.epochs.x=1", "pretrain.epochs.x: unknown key"),
        ("data.mean.0=0.5", "data.mean.0: unknown key"),
        ("data.extra=3", "data.extra: expected a mapping"),
        ("data.extra={1: a.txt}", "data.extra: keys must be strings"),
        ("dscl.beta=.nan", "dscl.beta: expected a finite number"),
        ("pretrain.temperature=.inf", "pretrain.temperature: expected a finite number"),
        (f"dscl.beta={10**400}", "dscl.beta: number too large"),
        ("threads=0", "threads: must be positive"),
        ("data.n_max=0", "data.n_max: must be positive"),
        ("data.patch_size=-2", "data.patch_size: must be positive"),
        ("data.imbalance_ratio=0.5", "data.imbalance_ratio: must be >= 1"),
        ("data.val_per_class=-1", "data.val_per_class: must not be negative"),
        ("data.few_threshold=200", "data.many_threshold: must be >= data.few_threshold"),
        ("data.std=[0.2, 0.0, 0.2]", "data.std: values must be positive"),
        ("classifier.eval_every=0", "classifier.eval_every: must be positive"),
        ("classifier.milestones=[-1]", "classifier.milestones: must not be negative"),
        ("classifier.weight_decay=-0.1", "classifier.weight_decay: must not be negative"),
        ("pretrain.momentum=-0.5", "pretrain.momentum: must not be negative"),
        ("ce.label_smoothing=1.5", "ce.label_smoothing: must be in [0, 1]"),
    ],
)
def test_values_that_would_fail_later_are_config_errors(override, needle):
    with pytest.raises(ConfigError) as err:
        build_config(None, [override])
    assert needle in str(err.value)
    assert "_Override" not in str(err.value)


def test_optional_settings_accept_null_and_positive_values():
    cfg = build_config(None, ["threads=2", "data.n_max=50", "data.imbalance_ratio=1"])
    assert (cfg.threads, cfg.data.n_max, cfg.data.imbalance_ratio) == (2, 50, 1.0)
    assert build_config(None, ["threads=null"]).threads is None


def test_config_errors_are_user_errors(tmp_path):
    from dscl.errors import UserError

    assert issubclass(ConfigError, UserError)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00name: x")
    with pytest.raises(ConfigError, match=r"binary\.yaml: not a text \(UTF-8\) file"):
        build_config(binary)
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"folder\.yaml"):
        build_config(folder)


def test_scientific_notation_is_a_number_in_files_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  weight_decay: 5e-4\n")  # YAML 1.1 reads this as text
    assert build_config(path).pretrain.weight_decay == 5e-4
    assert build_config(None, ["pretrain.base_lr=1E+1"]).pretrain.base_lr == 10.0
    with pytest.raises(ConfigError, match="pretrain.epochs: expected an integer"):
        build_config(None, ["pretrain.epochs=5e2"])
    with pytest.raises(ConfigError, match="pretrain.base_lr: expected a number"):
        build_config(None, ["pretrain.base_lr=5e"])


def test_one_first_difference_for_resume_and_study():
    from dscl.config import (
        ABSENT,
        RUNTIME_KEYS,
        STUDY_IGNORED_KEYS,
        config_to_dict,
        first_difference,
    )

    saved = config_to_dict(build_config("fashion_mnist_lt", ["threads=1"]))
    assert first_difference(saved, saved) is None
    # a changed thread count: --resume auto accepts it, a study refuses it (other digits)
    now = config_to_dict(build_config("fashion_mnist_lt", ["threads=2"]))
    assert first_difference(saved, now) is None
    diff = first_difference(saved, now, STUDY_IGNORED_KEYS)
    assert diff == ("threads", 1, 2) and str(diff) == "threads: saved 1, now 2"
    # where the folder is never matters; a result setting always does, in current's order
    moved = config_to_dict(build_config("fashion_mnist_lt", ["threads=1", "output_dir=/x"]))
    assert first_difference(saved, moved, STUDY_IGNORED_KEYS) is None
    other = config_to_dict(build_config("fashion_mnist_lt", ["threads=1", "seed=3", "amp=off"]))
    for ignore in (RUNTIME_KEYS, STUDY_IGNORED_KEYS):
        assert first_difference(saved, other, ignore) == ("seed", 0, 3)  # seed comes first
    # numbers by value, booleans and text by type; a key on one side only is a difference
    a = {"pretrain": {"momentum": 8, "x": True}, "data": {"extra": {"k": 1}}}
    assert (
        first_difference(a, {"pretrain": {"momentum": 8.0, "x": True}, "data": {"extra": {"k": 1}}})
        is None
    )
    assert first_difference(
        a, {"pretrain": {"momentum": 8, "x": 1}, "data": {"extra": {"k": 1}}}
    ) == (
        "pretrain.x",
        True,
        1,
    )
    diff = first_difference(a, {"pretrain": {"momentum": 8, "x": True}, "data": {"extra": {}}})
    assert diff == ("data.extra", {"k": 1}, {})  # a free-form mapping is one value
    diff = first_difference({"pretrain": {"momentum": 8}}, {"pretrain": {"momentum": 8, "new": 1}})
    assert diff.key == "pretrain.new" and diff.saved is ABSENT
    assert str(diff) == "pretrain.new: saved (absent), now 1"


def _old_layout(saved: dict) -> dict:
    """A config dict as runs wrote it before the methods' settings moved into sections: beta,
    pbsd_weight and label_smoothing under pretrain for every method, no sections."""
    old = {k: v for k, v in saved.items() if k not in ("dscl", "pbsd", "ce")}
    old["data"] = {k: v for k, v in saved["data"].items() if k != "decode_on_device"}
    old["pretrain"] = dict(saved["pretrain"])
    old["pretrain"]["beta"] = saved.get("dscl", {}).get("beta", 8.0)
    old["pretrain"]["pbsd_weight"] = saved.get("pbsd", {}).get("weight", 1.5)
    old["pretrain"]["label_smoothing"] = saved.get("ce", {}).get("label_smoothing", 0.0)
    return old


@pytest.mark.parametrize("method", ["ce", "supcon", "dscl", "supcon+pbsd", "dscl+pbsd"])
def test_configs_saved_before_the_sections_still_match(method):
    from dscl.config import STUDY_IGNORED_KEYS, first_difference

    cfg = build_config("fashion_mnist_lt", [f"method={method}"])
    now = config_to_dict(cfg)
    sections = {"ce": ["ce"], "dscl": ["dscl"], "dscl+pbsd": ["dscl", "pbsd"]}
    sections["supcon+pbsd"] = ["pbsd"]
    assert [k for k in now if k in ("dscl", "pbsd", "ce")] == sections.get(method, [])
    old = _old_layout(now)
    for ignore in (frozenset(), STUDY_IGNORED_KEYS):
        assert first_difference(old, now, ignore) is None
    assert config_from_dict(old) == cfg
    if "dscl" in now:  # a different old beta is still a difference, under its new name
        old["pretrain"]["beta"] = 2.0
        assert first_difference(old, now) == ("dscl.beta", 2.0, 8.0)


def test_a_section_the_method_does_not_use_is_accepted_and_not_recorded():
    cfg = build_config("fashion_mnist_lt", ["method=ce", "dscl.beta=4", "ce.label_smoothing=0.1"])
    saved = config_to_dict(cfg)
    assert (
        saved["ce"] == {"label_smoothing": 0.1} and "dscl" not in saved and "sections" not in saved
    )
    assert "dscl:" not in config_to_yaml(cfg)
    assert config_from_dict(saved) == cfg
    with pytest.raises(ConfigError, match="dscl.beta: must not be negative"):
        build_config("fashion_mnist_lt", ["method=ce", "dscl.beta=-4"])
    with pytest.raises(ConfigError, match="expected a mapping of sub-keys"):
        build_config(None, ["dscl=3"])


def test_peer_runs_from_before_their_own_views_still_match_on_the_query_and_key():
    """A bcl or paco run saved before ``augment`` existed trained on the query and key views:
    it matches ``augment=stage1``, not today's default."""
    from dscl.config import first_difference

    for method in ("bcl", "paco"):
        stage1 = config_to_dict(
            build_config(None, [f"method={method}", f"{method}.augment=stage1"])
        )
        old = {**stage1, method: dict(stage1[method])}
        for key in ("augment", "randaugment_ops", "randaugment_magnitude"):
            del old[method][key]
        assert first_difference(old, stage1) is None
        default = config_to_dict(build_config(None, [f"method={method}"]))
        assert default[method]["augment"] == "authors"
        assert first_difference(old, default) == (f"{method}.augment", "stage1", "authors")


def test_a_setting_added_since_is_read_at_the_value_the_old_run_had():
    from dscl.config import ADDED_KEYS, added_keys, first_difference, upgrade_saved

    now = config_to_dict(build_config("fashion_mnist_lt", ["data.file_views=per_sample"]))
    old = {**now, "data": {k: v for k, v in now["data"].items() if k not in ("file_views",)}}
    assert upgrade_saved(old)["data"]["file_views"] == ADDED_KEYS["data.file_views"]
    assert first_difference(old, now) is None
    fast = config_to_dict(build_config("fashion_mnist_lt", ["data.file_views=fast"]))
    assert first_difference(old, fast) == ("data.file_views", "per_sample", "fast")
    import dataclasses

    from dscl.methods import section_names, settings_class

    # every added key, the methods' own too, is a real setting (top-level, of a group or a section)
    assert added_keys()["bcl.augment"] == "stage1" and added_keys()["paco.augment"] == "stage1"
    for dotted in added_keys():
        group, _, key = dotted.rpartition(".")
        if not group:
            assert key in now, dotted
        elif group in section_names():
            assert key in {f.name for f in dataclasses.fields(settings_class(group))}, dotted
        else:
            assert key in now[group], dotted


def test_a_setting_neither_config_has_is_no_difference():
    """Comparing given keys, one that neither side has (a key another method's checkpoint has)
    is no difference; one that only one side has is."""
    from dscl.config import first_difference

    assert first_difference({"a": 1}, {"a": 1}, set(), keys=("x.y", "a")) is None
    assert first_difference({"a": 1}, {"a": 1, "x": {"y": 2}}, set(), keys=("x.y",)).key == "x.y"
