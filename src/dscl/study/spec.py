"""The study file: strict schema, grid expansion, cell names and resolved cell configs.

A study file is YAML with these top-level keys (any other key is an error)::

    name: tail_study                  # required; the study folder is <output_dir>/<name>/
    description: free text            # optional, printed at the top of RESULTS.md
    base: fashion_mnist_lt            # required; shipped config name or YAML path
    plugins: [my_methods.py]          # optional; modules or .py files (relative to the study
                                      # file) every cell imports, after the base config's own
    overrides: {pretrain.epochs: 40}  # optional; dotted config keys applied to every cell
    axes:                             # required; every combination of values is one cell
      method: [ce, dscl]
      seed: [0, 1, 2]
    baseline: {method: ce}            # optional; paired differences are taken against it; a
                                      # list ([{method: ce}, {method: dscl}]) gives one table
                                      # of paired differences per baseline
    results: results/tail_study       # optional; where finished cells are collected (default
                                      # results/<name>, relative to where the study runs)
    compare: [tail_study_short]       # optional; studies of other stage-1 budgets to plot against
    launcher: {kind: slurm, time: "48:00:00", gpus_per_cell: 8}   # optional; where cells run
                                      # (see dscl.study.launcher; default: here, --jobs at a time)

``overrides.output_dir`` places the study folder (default: the base config's ``output_dir``).
Every cell trains with the same ``threads`` (the study file's, else 1), whatever ``--jobs`` is,
because a run's digits depend on its thread count.
``plugins`` is set here only (not in ``overrides`` or ``axes``): the study imports them before
it validates the grid, and every cell's config carries them, resolved (:mod:`dscl.plugins`).
Axes are config keys; the ``seed`` axis is the one results are averaged over. Cells are
enumerated in grid order: the first axis varies slowest.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dscl.config import RunConfig, build_config, resolve_config_path
from dscl.errors import ConfigError
from dscl.plugins import KEY as PLUGINS
from dscl.plugins import load as load_plugins
from dscl.plugins import resolve as resolve_plugins
from dscl.study.launcher import Launcher, read_launcher

TOP_LEVEL_KEYS = (
    "name",
    "description",
    "base",
    "plugins",
    "overrides",
    "axes",
    "baseline",
    "results",
    "compare",
    "launcher",
)
RESULTS_ROOT = "results"  # the default results folder is results/<name>, from where it runs
DEFAULT_THREADS = 1  # every cell's torch threads when the study file sets none
SEED_AXIS = "seed"
RESERVED_AXES = ("name", "output_dir")
MAX_NAME_LENGTH = 150
_KEY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")


@dataclass(frozen=True)
class Cell:
    """One run of the grid.

    Attributes:
        index: position in grid order (0-based).
        name: run-folder name, e.g. ``method-dscl+pbsd_seed-1``.
        settings: axis key -> value, in axis order.
        coords: per-axis index of the value, in axis order.
        overrides: the ``key=value`` texts of its axis values (after the study overrides).
        config: the resolved config the cell runs with.
    """

    index: int
    name: str
    settings: dict[str, Any]
    coords: tuple[int, ...]
    overrides: tuple[str, ...]
    config: RunConfig = field(compare=False, repr=False)


@dataclass
class Study:
    """A validated study file and its expanded grid."""

    path: Path
    name: str
    description: str | None
    base: str  # as the cells' --config receives it: a shipped name or an absolute path
    overrides: dict[str, Any]  # as written, output_dir included
    override_texts: tuple[str, ...]  # passed to every cell (output_dir excluded)
    axes: dict[str, list[Any]]
    baselines: list[dict[str, Any]]  # paired differences are taken against each, in order
    study_dir: Path
    cells: list[Cell]
    results_dir: Path  # where this invocation reads and writes the results (``--results`` moves it)
    results_as_written: str  # ``results`` as the study file says it (study.yaml, RESULTS.md)
    compare: list[str] = field(default_factory=list)  # other studies (names or files) by budget
    launcher: Launcher | None = None  # the study file's launcher section, if any
    launcher_as_written: dict[str, Any] | None = None
    plugins: list[str] = field(default_factory=list)  # every cell's, resolved (base's included)

    @property
    def baseline(self) -> dict[str, Any] | None:
        """The first baseline (the one the study is mainly read against), if any."""
        return self.baselines[0] if self.baselines else None

    @property
    def seed_axis(self) -> str | None:
        """The axis averaged over (``seed``), if the grid has one."""
        return SEED_AXIS if SEED_AXIS in self.axes else None

    def setting_key(self, cell: Cell) -> tuple[int, ...]:
        """The cell's coordinates without the seed axis: the same for every seed of a setting."""
        axes = zip(self.axes, cell.coords, strict=True)
        return tuple(c for k, c in axes if k != self.seed_axis)

    def to_yaml(self) -> str:
        """The study as resolved: a valid study file that reproduces this grid."""
        data: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            data["description"] = self.description
        data["base"] = self.base
        if self.plugins:
            data["plugins"] = list(self.plugins)
        if self.overrides:
            data["overrides"] = dict(self.overrides)
        data["axes"] = {key: list(values) for key, values in self.axes.items()}
        if len(self.baselines) == 1:
            data["baseline"] = dict(self.baselines[0])
        elif self.baselines:
            data["baseline"] = [dict(b) for b in self.baselines]
        # the file's own value: a ``--results`` given to one invocation is not written, so a
        # committed study.yaml stays the same whichever checkout or folder ran the grid
        data["results"] = self.results_as_written
        if self.compare:
            data["compare"] = list(self.compare)
        if self.launcher_as_written is not None:
            data["launcher"] = dict(self.launcher_as_written)
        header = (
            "# dscl study: the study file as resolved (the base is a shipped name or an absolute "
            "path).\n# Run it again with: dscl study --config <this file>\n"
        )
        body = yaml.safe_dump(
            data, sort_keys=False, allow_unicode=True, default_flow_style=None, width=100
        )
        return header + body


def value_text(value: Any) -> str:
    """The text of ``value`` as a ``key=value`` override reads it back.

    Strings are passed as typed (the config keeps the text of string settings); everything else
    is YAML flow style, e.g. ``[0.05, 0.6]`` or ``{image_size: 16}``.
    """
    if isinstance(value, str):
        return value
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000, sort_keys=False)
    text = text.strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    elif text.endswith("..."):
        text = text[: -len("...")].rstrip()
    return text


def safe_value(value: Any) -> str:
    """A filesystem-safe, readable form of an axis value (``[0.05, 0.6]`` -> ``0.05-0.6``)."""
    if isinstance(value, (list, tuple)):
        return "-".join(safe_value(v) for v in value) if value else "empty"
    if isinstance(value, dict):
        parts = [f"{safe_value(k)}={safe_value(v)}" for k, v in value.items()]
        return "-".join(parts) if parts else "empty"
    text = value_text(value)
    return _UNSAFE.sub("~", text) if text else "empty"


def cell_name(settings: dict[str, Any]) -> str:
    """The run-folder name of a cell: ``key-value`` pairs joined by ``_`` in axis order.

    Names longer than :data:`MAX_NAME_LENGTH` are cut and end in a hash of the full name, so
    they stay unique and stable.
    """
    name = "_".join(f"{key}-{safe_value(value)}" for key, value in settings.items())
    if len(name) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: MAX_NAME_LENGTH - 11]}~{digest}"
    return name


def _fail(path: Path, text: str) -> ConfigError:
    return ConfigError(f"{path}: {text}")


def _check_key(path: Path, where: str, key: Any) -> str:
    if not isinstance(key, str) or not _KEY_PATTERN.match(key):
        raise _fail(path, f"{where}: {key!r} is not a config key (like pretrain.epochs)")
    return key


def _read_mapping(path: Path, data: dict, key: str) -> dict:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, f"{key}: expected a mapping, got {value!r}")
    return value


def _hashable(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=True)


def load_study(path: str | Path) -> Study:
    """Read, validate and expand a study file.

    Every cell's config is resolved (defaults <- base <- overrides <- axis values) before
    anything runs; any problem raises :class:`ConfigError` naming the file and the key.

    Args:
        path: a study YAML file, or the name of a shipped one (``study_fashion_mnist_lt``).

    Returns:
        The validated :class:`Study`.
    """
    path = resolve_config_path(str(path))
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise _fail(path, "the top level must be a mapping (name, base, overrides, axes, ...)")
    unknown = [str(k) for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise _fail(path, f"{unknown[0]}: unknown key (known keys: {', '.join(TOP_LEVEL_KEYS)})")

    name = data.get("name")
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise _fail(path, f"name: need a study name usable as a folder name, got {name!r}")
    description = data.get("description")
    if description is not None and not isinstance(description, str):
        raise _fail(path, f"description: expected text, got {description!r}")
    base = _resolve_base(path, data.get("base"))

    overrides = _read_mapping(path, data, "overrides")
    for key in overrides:
        _check_key(path, "overrides", key)
    study_plugins = _read_plugins(path, data)
    if "name" in overrides:
        raise _fail(path, "overrides.name: the study names its cells; use the study's name")
    axes = _read_axes(path, data, overrides)
    baselines = _read_baselines(path, data, axes)
    if "threads" not in overrides and "threads" not in axes:
        overrides = {**overrides, "threads": DEFAULT_THREADS}
    override_texts = tuple(
        f"{k}={value_text(v)}" for k, v in overrides.items() if k != "output_dir"
    )
    try:
        probe = build_config(base, [f"{k}={value_text(v)}" for k, v in overrides.items()])
    except ConfigError as err:
        raise _fail(path, f"overrides: {err}") from None
    plugins = list(dict.fromkeys([*probe.plugins, *study_plugins]))
    if plugins != probe.plugins:
        override_texts = (*override_texts, f"{PLUGINS}={value_text(plugins)}")
    study_dir = Path(probe.output_dir) / name
    compare = data.get("compare", [])
    if not isinstance(compare, list) or not all(isinstance(c, str) and c for c in compare):
        raise _fail(path, f"compare: need a list of study names or files, got {compare!r}")
    launcher = read_launcher(path, data.get("launcher"))
    results = data.get("results", f"{RESULTS_ROOT}/{name}")
    if not isinstance(results, str) or not results:
        raise _fail(path, f"results: need a folder path, got {results!r}")

    cells = _expand_cells(path, base, axes, override_texts, study_dir)
    return Study(
        path=path,
        name=name,
        description=description,
        base=base,
        overrides=dict(overrides),
        override_texts=override_texts,
        axes=axes,
        baselines=baselines,
        study_dir=study_dir,
        cells=cells,
        results_dir=Path(results),
        results_as_written=results,
        compare=list(compare),
        launcher=launcher,
        launcher_as_written=None if launcher is None else dict(data["launcher"]),
        plugins=plugins,
    )


def _expand_cells(
    path: Path, base: str, axes: dict, override_texts: tuple[str, ...], study_dir: Path
) -> list[Cell]:
    """Every cell of the grid ``axes``, its config resolved (defaults <- base <- overrides <-
    its axis values); two cells that would share a folder name are refused."""
    cells: list[Cell] = []
    seen: dict[str, dict] = {}
    keys = list(axes)
    ranges = [range(len(axes[k])) for k in keys]
    for index, coords in enumerate(itertools.product(*ranges)):
        settings = {k: axes[k][i] for k, i in zip(keys, coords, strict=True)}
        cname = cell_name(settings)
        if cname in seen:
            raise _fail(
                path,
                f"axes: cells {seen[cname]} and {settings} get the same folder name {cname!r}; "
                "make the values differ in letters or digits",
            )
        seen[cname] = settings
        texts = tuple(f"{k}={value_text(v)}" for k, v in settings.items())
        extra = [f"output_dir={study_dir}", f"name={cname}"]
        try:
            config = build_config(base, [*override_texts, *texts, *extra])
        except ConfigError as err:
            raise _fail(path, f"axes: cell {cname}: {err}") from None
        cells.append(Cell(index, cname, settings, tuple(coords), texts, config))
    return cells


def _read_plugins(path: Path, data: dict) -> list[str]:
    """The study file's ``plugins``, resolved against its folder and imported (so the grid's
    methods and sections validate); ``plugins`` in ``overrides`` or ``axes`` is refused."""
    for where in ("overrides", "axes"):
        if isinstance(data.get(where), dict) and PLUGINS in data[where]:
            raise _fail(path, f"{where}.{PLUGINS}: set plugins at the top of the study file")
    raw = data.get(PLUGINS, [])
    if not isinstance(raw, list) or not all(isinstance(entry, str) for entry in raw):
        raise _fail(path, f"{PLUGINS}: need a list of module names or .py files, got {raw!r}")
    try:
        entries = resolve_plugins(raw, path.parent)
        load_plugins(entries)
    except ConfigError as err:
        raise _fail(path, str(err)) from None
    return entries


def _resolve_base(path: Path, base: Any) -> str:
    """A shipped config name stays a name; a file becomes an absolute path."""
    if not isinstance(base, str) or not base:
        raise _fail(path, f"base: need a config name or YAML path, got {base!r}")
    resolved = resolve_config_path(base)
    if not resolved.is_file() and not Path(base).is_absolute():
        beside = resolve_config_path(str(path.parent / base))  # relative to the study file
        if beside.is_file():
            resolved = beside
    if not resolved.is_file():
        raise _fail(path, f"base: {base!r} is neither a shipped config nor a YAML file")
    shipped = Path(__file__).resolve().parents[1] / "configs"
    if resolved.resolve().parent == shipped and resolved.stem == base:
        return base
    return str(resolved.resolve())


def _read_axes(path: Path, data: dict, overrides: dict) -> dict[str, list[Any]]:
    raw = data.get("axes")
    if not isinstance(raw, dict) or not raw:
        raise _fail(path, "axes: need a mapping of config keys to lists of values")
    axes: dict[str, list[Any]] = {}
    for key, values in raw.items():
        _check_key(path, "axes", key)
        if key in RESERVED_AXES:
            raise _fail(path, f"axes.{key}: cannot be an axis (the study sets it)")
        if key in overrides:
            raise _fail(path, f"axes.{key}: also in overrides; keep it in one place")
        if not isinstance(values, list):
            raise _fail(path, f"axes.{key}: expected a list of values, got {values!r}")
        if not values:
            raise _fail(path, f"axes.{key}: empty axis (give at least one value)")
        seen = set()
        for value in values:
            token = _hashable(value)
            if token in seen:
                raise _fail(path, f"axes.{key}: value {value_text(value)} appears twice")
            seen.add(token)
        axes[key] = list(values)
    return axes


def _read_baselines(path: Path, data: dict, axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """``baseline``: one mapping of axis values, or a list of them (one paired table each)."""
    if "baseline" not in data:
        return []
    raw = data["baseline"]
    if isinstance(raw, list) and raw:
        entries = [(f"baseline[{i}]", entry) for i, entry in enumerate(raw)]
    else:
        entries = [("baseline", raw)]
    baselines: list[dict[str, Any]] = []
    for where, entry in entries:
        baseline = _read_one_baseline(path, where, entry, axes)
        if baseline in baselines:
            raise _fail(path, f"{where}: the same baseline appears twice")
        baselines.append(baseline)
    return baselines


def _read_one_baseline(
    path: Path, where: str, raw: Any, axes: dict[str, list[Any]]
) -> dict[str, Any]:
    if not isinstance(raw, dict) or not raw:
        raise _fail(
            path,
            f"{where}: need a mapping of axis values, like {{method: ce}}, or a list of them; "
            f"got {raw!r}",
        )
    for key, value in raw.items():
        if key not in axes:
            raise _fail(path, f"{where}.{key}: not an axis of this study ({', '.join(axes)})")
        if key == SEED_AXIS:
            raise _fail(path, f"{where}.seed: differences are paired by seed; name another axis")
        if _hashable(value) not in {_hashable(v) for v in axes[key]}:
            raise _fail(
                path,
                f"{where}.{key}: {value_text(value)} is not a value of axis {key} "
                f"({', '.join(value_text(v) for v in axes[key])})",
            )
    return dict(raw)
