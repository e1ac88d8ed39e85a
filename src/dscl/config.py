"""Typed run configuration: dataclass defaults <- YAML file <- ``key.sub=value`` overrides.

Every key is checked: an unknown key or a value of the wrong type raises :class:`ConfigError`
naming the key (and the file), before any work starts. The resolved config is written to the run
folder and stored in every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dscl.errors import ConfigError
from dscl.settings import (  # noqa: F401 - the settings' values and feed settings, here too
    AMP_MODES,
    BN_MODES,
    FILE_VIEWS,
    LABEL_ORDER,
    VAL_SHORTFALL,
    FeedSettings,
    check_choice,
)

_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class DataConfig:
    name: str = "fashion_mnist_lt"  # a name from dscl.data.DATASETS
    root: str | None = None  # dataset folder; None: the dataset's default search path
    n_max: int | None = None  # images in the largest class (None: the dataset's default)
    imbalance_ratio: float | None = None  # n_max / n_min (None: the dataset's default)
    seed: int = 0  # which images the long-tailed subset keeps
    # which class gets which count of the profile: "label" (class c gets the c-th largest) or an
    # integer seed that permutes the classes over the counts (separates frequency from difficulty)
    class_order: int | str = LABEL_ORDER
    val_per_class: int = 20  # validation images per class where none are published
    # when a class has too few unused images for validation (CIFAR-LT's head class): "partial"
    # gives it fewer, "carve" moves the missing ones out of its training images, "error" stops
    val_shortfall: str = "partial"  # one of VAL_SHORTFALL
    skip_bad_images: bool = False
    download: bool = False  # allow torchvision's downloaders (never needed offline)
    extra: dict[str, Any] = field(default_factory=dict)  # list-file paths, image root, ...
    image_size: int = 28  # view size in pixels (S)
    patch_size: int | None = None  # None: round(S * 64 / 224)
    num_patches: int = 5  # L
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # query/key crop area
    patch_scale: list[float] = field(default_factory=lambda: [0.05, 0.6])  # patch box area
    color_augment: bool = True  # colour jitter, grayscale and blur on the views
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    num_workers: int = 0  # DataLoader workers for image files (and the per-sample path)
    # image-file datasets: "fast" (workers decode once and crop to uint8, colour ops batched on
    # the device) or "per_sample" (the whole transform per image in the workers)
    file_views: str = "fast"  # one of FILE_VIEWS
    jpeg_draft: int = 0  # fast path: decode JPEGs at 1/2..1/8 scale keeping this shorter side
    decode_on_device: bool = False  # fast path on CUDA: decode JPEGs there (nvJPEG), not in workers
    batched_views: bool = True  # build views on the device when the dataset fits in memory
    many_threshold: int = 100  # Many: more than this many training images
    few_threshold: int = 20  # Few: fewer than this many

    def feed_settings(self) -> FeedSettings:
        """How this run's batches are fed (the ``TrainFeed`` and ``eval_batches`` settings)."""
        return FeedSettings(
            num_workers=self.num_workers,
            in_memory=self.batched_views,
            file_views=self.file_views,
            jpeg_draft=self.jpeg_draft,
            decode_on_device=self.decode_on_device,
        )


@dataclass
class ModelConfig:
    backbone: str = "resnet32"
    embed_dim: int = 128  # D
    pretrained: bool = False  # torchvision weights (a download; off by default)
    # start every residual block as the identity (last BN scale 0), as the authors' ImageNet runs
    zero_init_residual: bool = False


@dataclass
class PretrainConfig:
    epochs: int = 200
    batch_size: int = 256  # B, global over all processes
    base_lr: float = 0.1  # lr at batch 256; lr = base_lr * B / 256
    warmup_epochs: int = 10
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4
    temperature: float = 0.07  # tau
    queue_size: int = 8192  # K
    encoder_momentum: float = 0.999  # EMA of the key encoder
    save_every_steps: int = 0  # mid-epoch checkpoint every this many steps (0: epoch ends only)
    knn_every: int = 0  # kNN monitor on the validation split every this many epochs (0: off)


@dataclass
class ClassifierConfig:
    epochs: int = 40
    batch_size: int = 2048
    base_lr: float = 10.0  # lr at batch 2048; scaled linearly
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [20, 30])
    gamma: float = 0.1
    # what stage 2 trains: "probe" (a new linear layer on the frozen backbone), "keep" (the
    # method's own classifier as stage 1 left it; nothing is trained), "retrain" (the method's
    # classifier retrained on the frozen backbone), "auto" (keep for one-stage methods, bcl and
    # paco; probe for the others)
    mode: str = "auto"
    bn_mode: str = "train"  # BN_MODES: "train" re-estimates BN statistics, "eval" keeps them
    balanced: bool = True  # class-balanced sampling
    eval_every: int = 1  # validate every this many epochs
    save_every_steps: int = 0  # mid-epoch checkpoint every this many steps (0: epoch ends only)


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    method: str = "dscl+pbsd"  # a registered method (dscl.methods): ce, supcon, dscl, ...+pbsd
    # modules (my_pkg.methods) or .py files imported before the config is parsed, so that what
    # they register can be named; files are stored resolved (dscl.plugins)
    plugins: list[str] = field(default_factory=list)
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    amp: str = "auto"  # AMP_MODES: "auto" (bf16 on GPU), "off", "bf16", "fp16"
    channels_last: bool = True
    # torch.compile the stage-1 encoders' training forward (eval passes stay eager). Costs a
    # compile of a minute or more at the first steps; see docs/DEVICES.md for when it pays off.
    compile: bool = False
    threads: int | None = None  # torch CPU threads; None: all cores / local processes
    log_every: int = 20  # steps between log lines
    # also write the stage's checkpoint when this many minutes passed since the last one (0: off);
    # see pretrain.save_every_steps / classifier.save_every_steps for a step cadence
    save_every_minutes: float = 10.0
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    # The methods' own settings, by section (``dscl.beta``, ``pbsd.weight``, ``ce.*``, ...): each
    # section is a dataclass registered with the method's builder (dscl.methods.register_method).
    # Only the sections the run's method uses are recorded (config_to_dict) and compared.
    sections: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __eq__(self, other: object) -> bool:
        """Equal settings, the method's sections included (sections it does not use aside)."""
        if not isinstance(other, RunConfig):
            return NotImplemented
        return config_to_dict(self) == config_to_dict(other)

    def section(self, name: str) -> Any:
        """The settings of section ``name`` (its defaults where nothing set them)."""
        if name not in self.sections:
            from dscl.methods import settings_class

            self.sections[name] = settings_class(name)()
        return self.sections[name]

    def stage2_mode(self) -> str:
        """What stage 2 does for this method and ``classifier.mode``: ``probe``, ``keep`` or
        ``retrain`` (:func:`dscl.methods.classifier_mode`; raises ConfigError where the method
        has no classifier of its own for keep/retrain)."""
        from dscl.methods import classifier_mode  # the registry (imports torch)

        return classifier_mode(self.method, self.classifier.mode)

    def validate(self) -> None:
        """Check values that types alone cannot; raise ConfigError naming the key."""
        from dscl.methods import check_method, method_sections  # the registry (imports torch)

        check_method(self.method)
        self.stage2_mode()
        self._check_sections(method_sections(self.method))
        self._check_choices()
        self._check_numbers()
        self._check_views_and_name()

    def _check_sections(self, read: tuple[str, ...]) -> None:
        """The method's settings sections (``read``) and any other section set, so a bad value
        never waits for the grid cell of a method that reads it."""
        for name in dict.fromkeys([*read, *self.sections]):
            settings = self.section(name)
            check = getattr(settings, "check", None)
            if check is not None:
                try:
                    check()
                except ConfigError as err:
                    raise ConfigError(f"{name}.{err}") from None

    def _check_choices(self) -> None:
        """Settings that take one of a few values, and the combinations they allow."""
        check_choice("classifier.bn_mode", self.classifier.bn_mode, BN_MODES)
        check_choice("data.val_shortfall", self.data.val_shortfall, VAL_SHORTFALL)
        check_choice("data.file_views", self.data.file_views, FILE_VIEWS)
        if self.data.jpeg_draft and self.data.file_views != "fast":
            raise ConfigError("data.jpeg_draft: applies to data.file_views=fast only")
        if self.data.decode_on_device and (self.data.file_views != "fast" or self.data.jpeg_draft):
            raise ConfigError(
                "data.decode_on_device: needs data.file_views=fast and data.jpeg_draft=0"
            )
        order = self.data.class_order
        if isinstance(order, str) and order != LABEL_ORDER:
            raise ConfigError(
                f"data.class_order: {order!r} is neither {LABEL_ORDER!r} nor an integer seed"
            )
        check_choice("amp", self.amp, AMP_MODES)

    def _check_numbers(self) -> None:
        """Counts, sizes, rates and thresholds within their ranges."""
        positive = {
            "pretrain.epochs": self.pretrain.epochs,
            "pretrain.batch_size": self.pretrain.batch_size,
            "pretrain.temperature": self.pretrain.temperature,
            "classifier.epochs": self.classifier.epochs,
            "classifier.batch_size": self.classifier.batch_size,
            "data.image_size": self.data.image_size,
            "data.num_patches": self.data.num_patches,
            "model.embed_dim": self.model.embed_dim,
            "log_every": self.log_every,
            "classifier.eval_every": self.classifier.eval_every,
            "classifier.gamma": self.classifier.gamma,
            # optional settings: None means "the default" and is always allowed
            "threads": self.threads,
            "data.n_max": self.data.n_max,
            "data.patch_size": self.data.patch_size,
        }
        for key, value in positive.items():
            if value is not None and value <= 0:
                raise ConfigError(f"{key}: must be positive, got {value}")
        non_negative = {
            "pretrain.warmup_epochs": self.pretrain.warmup_epochs,
            "pretrain.queue_size": self.pretrain.queue_size,
            "pretrain.base_lr": self.pretrain.base_lr,
            "pretrain.momentum": self.pretrain.momentum,
            "pretrain.weight_decay": self.pretrain.weight_decay,
            "classifier.base_lr": self.classifier.base_lr,
            "classifier.momentum": self.classifier.momentum,
            "classifier.weight_decay": self.classifier.weight_decay,
            "data.num_workers": self.data.num_workers,
            "data.jpeg_draft": self.data.jpeg_draft,
            "save_every_minutes": self.save_every_minutes,
            "pretrain.save_every_steps": self.pretrain.save_every_steps,
            "pretrain.knn_every": self.pretrain.knn_every,
            "classifier.save_every_steps": self.classifier.save_every_steps,
            "data.val_per_class": self.data.val_per_class,
            "data.few_threshold": self.data.few_threshold,
        }
        for key, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{key}: must not be negative, got {value}")
        ratio = self.data.imbalance_ratio
        if ratio is not None and ratio < 1:
            raise ConfigError(f"data.imbalance_ratio: must be >= 1 (n_max / n_min), got {ratio}")
        if self.data.many_threshold < self.data.few_threshold:
            raise ConfigError(
                f"data.many_threshold: must be >= data.few_threshold "
                f"({self.data.few_threshold}), got {self.data.many_threshold}"
            )
        milestones = self.classifier.milestones
        if any(epoch < 0 for epoch in milestones):
            raise ConfigError(f"classifier.milestones: must not be negative, got {milestones}")
        ema = self.pretrain.encoder_momentum
        if not 0.0 <= ema <= 1.0:
            raise ConfigError(f"pretrain.encoder_momentum: must be in [0, 1], got {ema}")

    def _check_views_and_name(self) -> None:
        """The crop ranges, the normalisation and the run folder's name."""
        for key in ("crop_scale", "patch_scale"):
            low, high = (getattr(self.data, key) + [0.0, 0.0])[:2]
            if len(getattr(self.data, key)) != 2 or not 0.0 < low <= high <= 1.0:
                raise ConfigError(f"data.{key}: need [low, high] with 0 < low <= high <= 1")
        if len(self.data.mean) != 3 or len(self.data.std) != 3:
            raise ConfigError("data.mean / data.std: need 3 values (RGB)")
        if any(value <= 0 for value in self.data.std):
            raise ConfigError(f"data.std: values must be positive, got {self.data.std}")
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"name: {self.name!r} is not a valid run folder name")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _Override(typing.NamedTuple):
    """A command-line value: its text as typed and its YAML reading (``off`` reads as False)."""

    text: str
    parsed: Any


def _accepts_str(tp: Any) -> bool:
    is_union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return tp is str or (is_union and str in typing.get_args(tp))


def _is_mapping_type(tp: Any) -> bool:
    """True for a ``dict[...]`` annotation (alone or in a union such as ``dict | None``)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_is_mapping_type(arg) for arg in typing.get_args(tp))
    return tp is dict or typing.get_origin(tp) is dict


def _holds_override(value: Any) -> bool:
    """True when ``value`` is, or is a mapping that holds, a command-line ``_Override``."""
    if isinstance(value, _Override):
        return True
    return isinstance(value, dict) and any(_holds_override(v) for v in value.values())


def _plain(value: Any) -> Any:
    """``value`` with every ``_Override`` in it replaced by its YAML reading."""
    if isinstance(value, _Override):
        return value.parsed
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new mapping: ``base`` with ``update``'s keys set, merging mappings under a shared key."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked against the annotation ``tp``; raise ConfigError naming ``key``."""
    if isinstance(value, _Override):
        # A string setting takes the text as typed (so amp=off stays "off"), except null and,
        # for a setting that is an integer or a string (data.class_order), an integer.
        parsed_int = isinstance(value.parsed, int) and not isinstance(value.parsed, bool)
        int_too = int in typing.get_args(tp)
        keep_text = _accepts_str(tp) and value.parsed is not None and not (parsed_int and int_too)
        value = value.text if keep_text else value.parsed
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if tp is Any:
        return _plain(value)  # a free-form value: what YAML reads (as inside a mapping)
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_type, value_type = args if args else (Any, Any)
        out = {}
        for sub, item in value.items():
            if key_type is str and not isinstance(sub, str):
                raise ConfigError(f"{key}: keys must be strings, got {sub!r}")
            # A value set by a dotted key (data.extra.x=...) follows the rule of its own type.
            out[sub] = _coerce(item, value_type, f"{key}.{sub}")
        return out
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 5e-4 (no dot) as text
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise ConfigError(f"{key}: number too large, got {value!r}") from None
            if not math.isfinite(number):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        hint = (
            " (quote it: YAML reads off/on/yes/no as booleans)" if isinstance(value, bool) else ""
        )
        raise ConfigError(f"{key}: expected a string, got {value!r}{hint}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _apply(obj: Any, mapping: dict[str, Any], prefix: str = "") -> None:
    """Set the fields of dataclass ``obj`` from ``mapping``, recursing into nested configs."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)} - {"sections"}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(obj, RunConfig) and key not in names and _is_section(key):
            if isinstance(value, _Override):
                value = value.parsed
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of sub-keys, got {value!r}")
            _apply(obj.section(key), value, prefix=f"{full}.")
            continue
        if key not in names:
            moved = MOVED_KEYS.get(full)
            if moved is not None:
                raise ConfigError(
                    f"{full}: this setting moved to {moved} (a setting of the methods that "
                    f"use section {moved.split('.')[0]})"
                )
            known = ", ".join(
                sorted(names | (_section_names() if isinstance(obj, RunConfig) else set()))
            )
            raise ConfigError(f"{full}: unknown key (known keys here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if isinstance(value, _Override):
                value = value.parsed
            if not isinstance(value, dict):
                raise ConfigError(f"{full}: expected a mapping of sub-keys, got {value!r}")
            _apply(current, value, prefix=f"{full}.")
        elif _is_mapping_type(hints[key]):
            # Mapping settings (data.extra): a dotted key (data.extra.x=1) adds to what the
            # defaults and the YAML file gave; a whole mapping typed on the command line
            # (data.extra={...}) replaces it, so `data.extra={}` clears it.
            replace = isinstance(value, _Override)
            value = _coerce(value, hints[key], full)
            if not replace and isinstance(current, dict) and isinstance(value, dict):
                value = _merge(current, value)
            setattr(obj, key, value)
        elif isinstance(value, dict) and _holds_override(value):
            sub = next(iter(value))  # a dotted key below a setting that has no sub-keys
            raise ConfigError(
                f"{full}.{sub}: unknown key ({full} is a single value, not a mapping)"
            )
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


# Settings that belong to one family of methods and moved into its section. An old key on the
# command line or in a YAML file is refused with its new place; a saved config (a run folder's
# config.yaml, a checkpoint, a committed study cell) is upgraded when read (upgrade_saved).
MOVED_KEYS = {
    "pretrain.beta": "dscl.beta",
    "pretrain.pbsd_weight": "pbsd.weight",
    "pretrain.label_smoothing": "ce.label_smoothing",
}


# Settings added after runs were written, with the value that reproduces what such a run did: a
# saved config without the key is read with that value (upgrade_saved). Adding a setting means
# adding it here, so that earlier run folders and committed study cells are still recognised; a
# setting added to a method's own section goes into its MethodSpec's ``added`` instead.
ADDED_KEYS = {
    "plugins": [],  # a top-level key (no group)
    "data.file_views": "per_sample",
    "data.jpeg_draft": 0,
    "data.decode_on_device": False,
    "classifier.mode": "auto",  # auto is probe for every method that existed before it
    "model.zero_init_residual": False,
}


def _is_section(name: str) -> bool:
    from dscl.methods import section_names

    return name in section_names()


def _section_names() -> set[str]:
    from dscl.methods import section_names

    return set(section_names())


def added_keys() -> dict[str, Any]:
    """Every setting added after runs were written, with the value such a run had in effect:
    :data:`ADDED_KEYS`, then those of each method's own section (its MethodSpec's ``added``)."""
    from dscl.methods import method_specs  # the registry (imports torch)

    added = dict(ADDED_KEYS)
    for spec in method_specs():
        added.update((f"{spec.name}.{key}", value) for key, value in spec.added.items())
    return added


def upgrade_saved(mapping: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict in today's layout: settings added since (:func:`added_keys`) at the
    value the run had in effect, and the keys of :data:`MOVED_KEYS` moved into the sections of
    the method it ran (dropped where that method has no such section), so a run folder or study
    cell written before compares equal to the config it ran."""
    if not isinstance(mapping, dict):
        return mapping
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in mapping.items()}
    method = out.get("method")
    try:
        from dscl.methods import method_sections

        used = set(method_sections(method)) if isinstance(method, str) else set()
    except ConfigError:
        used = set()
    for dotted, legacy in added_keys().items():
        group, _, key = dotted.rpartition(".")
        if not group:
            out.setdefault(key, copy.deepcopy(legacy))
        elif isinstance(out.get(group), dict) and key not in out[group]:
            out[group][key] = legacy
    for old, new in MOVED_KEYS.items():
        group, key = old.split(".")
        if not isinstance(out.get(group), dict) or key not in out[group]:
            continue
        value = out[group].pop(key)
        section, name = new.split(".")
        if section in used:
            target = out.setdefault(section, {})
            if isinstance(target, dict):
                target.setdefault(name, value)
    return out


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``"pretrain.epochs=5"`` into ``{"pretrain": {"epochs": 5}}`` (YAML-typed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {err}") from None
    return _nest(key, _Override(raw.strip(), value))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def resolve_config_path(name_or_path: str) -> Path:
    """A file path, or the name of a shipped config (``fashion_mnist_lt`` -> configs/…yaml)."""
    path = Path(name_or_path)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return path
    shipped = Path(__file__).resolve().parent / "configs" / f"{name_or_path}.yaml"
    return shipped if shipped.is_file() else path


def build_config(
    config_file: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Defaults <- YAML file <- ``key.sub=value`` overrides, validated; the plugins they name
    are imported first (:func:`_plugins_first`)."""
    cfg = RunConfig()
    path, data = None, {}
    if config_file is not None:
        path = resolve_config_path(str(config_file))
        data = load_yaml(path)  # its errors name the file already
    parsed = [parse_override(text) for text in overrides]
    plugins = _plugins_first([(path, data), *((None, o) for o in parsed)])
    try:
        _apply(cfg, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    for override in parsed:
        _apply(cfg, override)
    cfg.plugins = plugins
    cfg.validate()
    return cfg


def _plugins_first(sources: list[tuple[Path | None, dict[str, Any]]]) -> list[str]:
    """The ``plugins`` list that the last of ``sources`` to set it gives, imported before the
    config is parsed (:mod:`dscl.plugins`), so the methods and sections they register validate.

    ``sources`` are (config file or None, its mapping) in the order they apply; a relative file
    is resolved against the folder of the config file that names it, or the current folder.
    """
    from dscl import plugins

    entries: list[str] = []
    where = plugins.KEY
    for path, mapping in sources:
        if plugins.KEY in mapping:
            where = f"{path}: {plugins.KEY}" if path is not None else plugins.KEY
            try:
                given = _coerce(mapping[plugins.KEY], list[str], plugins.KEY)
                entries = plugins.resolve(given, path.parent if path is not None else Path.cwd())
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None
    plugins.load(entries, where)
    return entries


def config_from_dict(mapping: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from :func:`config_to_dict` output (e.g. from a checkpoint), saved
    before or after the methods' settings moved into sections."""
    cfg = RunConfig()
    saved = upgrade_saved(mapping)
    _plugins_first([(None, saved)])
    _apply(cfg, saved)
    cfg.validate()
    return cfg


# Settings that change how a run executes but not what it computes: a resumed run may differ from
# the saved one in these, and `--resume auto` ignores them when comparing configs.
RUNTIME_KEYS = frozenset(
    {
        "name",
        "output_dir",
        "device",
        "threads",
        "compile",
        "log_every",
        "progress",
        "save_every_minutes",
        "pretrain.save_every_steps",
        "pretrain.knn_every",
        "classifier.save_every_steps",
        "data.root",
        "data.download",
        "data.num_workers",
        # where the code of a method lives, not what it computes (dscl.plugins says why)
        "plugins",
    }
)


# Runtime settings that nonetheless change a run's digits: a study compares them (every cell of
# a study trains with the same thread count, device and compile setting), `--resume auto` not.
DIGIT_KEYS = frozenset({"threads", "compile", "device"})
# What a study ignores when it compares a cell's saved config with what it resolves now.
STUDY_IGNORED_KEYS = RUNTIME_KEYS - DIGIT_KEYS


class _Absent:
    """A key present in only one of two compared configs."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


class Difference(typing.NamedTuple):
    """The first key where two configs differ, with the saved and the current value."""

    key: str
    saved: Any
    now: Any

    def __str__(self) -> str:
        return f"{self.key}: saved {self.saved!r}, now {self.now!r}"


def same_value(a: Any, b: Any) -> bool:
    """Equal as config values: numbers by value (8 == 8.0), booleans and text by type too."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value; ``data.extra`` (a free-form mapping) stays one value."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted != "data.extra":
            out.update(_flat(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def first_difference(
    saved: dict[str, Any],
    current: dict[str, Any],
    ignore: frozenset[str] | set[str] = RUNTIME_KEYS,
    *,
    keys: tuple[str, ...] | None = None,
) -> Difference | None:
    """The first dotted key (in ``current``'s order, then keys only ``saved`` has) where two
    config dicts differ, or None when they agree on every key outside ``ignore``.

    ``saved`` may predate the methods' sections (:func:`upgrade_saved`). ``--resume auto``
    ignores :data:`RUNTIME_KEYS`; a study ignores :data:`STUDY_IGNORED_KEYS`
    (it also compares the thread count, device and compile setting). A key missing on one side
    is a difference, its value shown as ``(absent)``. With ``keys`` only those dotted keys are
    compared, in their order (what a checkpoint must share with the run that reads it).
    """
    flat_saved, flat_now = _flat(upgrade_saved(saved)), _flat(upgrade_saved(current))
    if keys is None:
        keys = (*flat_now, *(k for k in flat_saved if k not in flat_now))
    for key in keys:
        if key in ignore:
            continue
        a, b = flat_saved.get(key, ABSENT), flat_now.get(key, ABSENT)
        if a is ABSENT and b is ABSENT:  # a setting neither has: no difference
            continue
        if a is ABSENT or b is ABSENT or not same_value(a, b):
            return Difference(key, a, b)
    return None


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain data: every setting, and the sections of the run's method."""
    from dscl.methods import method_sections

    out = dataclasses.asdict(cfg)
    del out["sections"]
    for name in method_sections(cfg.method):
        out[name] = dataclasses.asdict(cfg.section(name))
    return out


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
