"""Plugins: code outside the package that registers methods, settings sections, backbones or
datasets, imported before any config is parsed.

Two sources, each plugin imported once per process:

* every entry point of the group ``dscl.plugins`` of the installed distributions
  (:func:`load_entry_points`; the ``dscl`` command loads them before any command, and
  :func:`load` before the config's own plugins), and
* the config key ``plugins``: importable module names (``my_pkg.methods``) or ``.py`` files
  (:func:`load`). :func:`dscl.config.build_config` reads the key from the YAML file and the
  overrides and imports the plugins before the strict parse, so ``method: focal`` and
  ``focal.gamma=1`` validate.

An entry that ends in ``.py`` or holds a ``/`` is a file; any other is a module name. A relative
file is resolved against the folder of the config file that names it (the current folder for a
command-line override) and stored resolved (:func:`resolve`), so a study cell that runs in
another folder finds it. A file is imported under a module name made from its resolved path
(:func:`module_name`), the same in every process.

Every failure is a :class:`~dscl.errors.ConfigError` of one line that names the key and the
plugin: a file not found, a module not found, or an exception raised while importing it (its
type, its message and the plugin's file:line where it was raised).

``plugins`` is not part of a run's identity (:data:`dscl.config.RUNTIME_KEYS`): what a run
computes is fixed by its method and settings, which are compared; where the code of the method
lives is not, any more than the commit of dscl's own methods is. A run resumes, and a study cell
is recognised, whichever way its plugins are written (relative or resolved) or wherever the file
has moved to (named there); each file's sha256 is recorded beside the commit in the run's
checkpoints (:func:`file_digests`). A command that reads a checkpoint without a config (predict,
export) imports the plugins it names; one that has moved is a warning where the checkpoint's method
and backbone need none (``dscl.checkpoint.import_plugins``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import pickle
import re
import sys
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dscl.errors import ConfigError

ENTRY_POINT_GROUP = "dscl.plugins"
KEY = "plugins"
_MODULE_PREFIX = "dscl_plugin_"
_entry_points_loaded = False


def is_file(entry: str) -> bool:
    """True when a ``plugins`` entry names a ``.py`` file rather than a module."""
    return entry.endswith(".py") or "/" in entry


def resolve(entries: Iterable[str], base: Path) -> list[str]:
    """``entries`` with every relative file made absolute against the folder ``base``; module
    names as they are. An empty entry is refused."""
    out = []
    for i, entry in enumerate(entries):
        if not entry.strip():
            raise ConfigError(f"{KEY}[{i}]: empty entry (a module name or a .py file)")
        if is_file(entry):
            entry = str((Path(base) / Path(entry).expanduser()).resolve())
        out.append(entry)
    return out


def module_name(path: str | Path) -> str:
    """The module name a ``.py`` plugin is imported under: its file name and a hash of its
    resolved path, so the same file gets the same name in every process and two files of the
    same name do not clash."""
    path = Path(path).resolve()
    stem = re.sub(r"\W", "_", path.stem)
    return f"{_MODULE_PREFIX}{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"


def load(entries: Iterable[str], key: str = KEY) -> None:
    """Import the entry points (once), then each plugin of ``entries`` not imported yet.

    Args:
        entries: resolved ``plugins`` entries (:func:`resolve`).
        key: the key the errors name (``plugins``, or a file's ``<file>: plugins``).

    Raises:
        ConfigError: a file or module not found, or an exception while importing it.
    """
    load_entry_points()
    for entry in entries:
        if is_file(entry):
            _import_file(Path(entry), key)
        else:
            _import_module(entry, key)


def load_entry_points() -> None:
    """Import every entry point of the group ``dscl.plugins``, once per process.

    An entry point names a module (``focal = my_pkg.focal``) whose import registers what it
    defines. A failure is a ConfigError naming the distribution and the entry point."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = point.dist
        owner = "no distribution" if dist is None else f"distribution {dist.name} {dist.version}"
        where = f"entry point {point.name} = {point.value} ({owner}, group {ENTRY_POINT_GROUP})"
        try:
            point.load()
        except Exception as err:
            if _not_found(err, point.module):
                raise ConfigError(f"{where}: module {point.module!r} not found") from None
            raise ConfigError(f"{where}: {_raised(err, _module_root(point.module))}") from None
    _entry_points_loaded = True


def file_digests(entries: Iterable[str]) -> dict[str, str | None]:
    """``{file: sha256}`` of the ``.py`` plugins of ``entries`` (module plugins are left to the
    installed distribution's version); None for a file that cannot be read any more."""
    out = {}
    for entry in entries:
        if is_file(entry):
            try:
                out[entry] = hashlib.sha256(Path(entry).read_bytes()).hexdigest()
            except OSError:
                out[entry] = None
    return out


def pickled(obj: Any, entries: Iterable[str]) -> dict[str, Any]:
    """``obj`` pickled together with the plugins it needs: a config may hold the settings of a
    ``.py`` plugin, whose module a fresh process knows only once it imported the plugin
    (:func:`unpickled`)."""
    return {KEY: list(entries), "pickle": pickle.dumps(obj)}


def unpickled(state: dict[str, Any]) -> Any:
    """What :func:`pickled` packed: the plugins imported first, then the object."""
    load(state[KEY])
    return pickle.loads(state["pickle"])


def _import_file(path: Path, key: str) -> None:
    name = module_name(path)
    if name in sys.modules:
        return
    if not path.is_file():
        what = "is not a file" if path.exists() else "plugin file not found"
        raise ConfigError(f"{key}: {path}: {what}")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{key}: {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickle look their classes' module up here
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]  # a failed plugin is imported afresh, and fails the same way
        raise ConfigError(f"{key}: {path}: {_raised(err, path)}") from None


def _import_module(name: str, key: str) -> None:
    try:
        importlib.import_module(name)
    except Exception as err:
        if _not_found(err, name):
            raise ConfigError(f"{key}: {name}: module not found") from None
        raise ConfigError(f"{key}: {name}: {_raised(err, _module_root(name))}") from None


def _not_found(err: Exception, name: str) -> bool:
    """True when ``err`` says that module ``name`` (or a package above it) does not exist, not
    that something the plugin imports is missing."""
    missing = getattr(err, "name", None)
    return (
        isinstance(err, ModuleNotFoundError)
        and bool(missing)
        and (name == missing or name.startswith(f"{missing}."))
    )


def _module_root(name: str) -> Path | None:
    """The file of module ``name``, or the folder of its top-level package, where it can be
    found without importing it."""
    try:
        spec = importlib.util.find_spec(name.split(".")[0])
    except Exception:
        return None
    if spec is None or spec.origin is None:
        return None
    origin = Path(spec.origin)
    return origin.parent if spec.submodule_search_locations else origin


def _raised(err: Exception, root: Path | None) -> str:
    """``importing it raised <type>: <message> (at <file>:<line>)``, at the innermost line of the
    plugin's own code (``root``: its file or package folder) where there is one."""
    message = err.msg if isinstance(err, SyntaxError) else err  # its str() holds the place too
    text = f"importing it raised {type(err).__name__}: {message}".strip()
    if isinstance(err, SyntaxError) and err.filename:
        return f"{text} (at {err.filename}:{err.lineno})"
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith("<")]
    own = [f for f in frames if root is not None and _inside(f.filename, root)]
    frame = (own or frames or [None])[-1]
    return text if frame is None else f"{text} (at {frame.filename}:{frame.lineno})"


def _inside(filename: str, root: Path) -> bool:
    path = Path(filename).resolve()
    root = root.resolve()
    return path == root or root in path.parents
