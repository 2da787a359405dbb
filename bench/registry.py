"""The defense registry: ``@register_defense``, ``create_defense``, ``list_defenses``.

Built-in defenses and third-party plugins are found the same way, through the entry-point
group ``certbench.defenses``: loading an entry point imports its module, and importing the
module runs its ``@register_defense`` decorator. A plugin declares, in its own
``pyproject.toml``::

    [project.entry-points."certbench.defenses"]
    my-defense = "my_package.my_defense"

Rules: names are unique kebab-case strings (a duplicate raises, naming both sources); an
unknown name raises with the list of known ones; a plugin that fails to import is reported
by name (:func:`broken_plugins`, a warning) and does not break the built-ins. Setting
``CERTBENCH_DISABLE_PLUGIN_AUTOLOAD=1`` skips third-party entry points (built-ins still load).
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, TypeVar

from bench.errors import ConfigError, RegistryError
from defenses import BUILTIN_MODULES
from defenses.base import Defense

ENTRY_POINT_GROUP = "certbench.defenses"
AUTOLOAD_ENV = "CERTBENCH_DISABLE_PLUGIN_AUTOLOAD"
_NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

D = TypeVar("D", bound=type[Defense])


@dataclass
class _Entry:
    cls: type[Defense]
    source: str  # "module:Class"
    package: str = "certbench"


_REGISTRY: dict[str, _Entry] = {}
_BROKEN: dict[str, str] = {}
_LOADED = False
_CURRENT_PACKAGE: list[str] = []


def _source_of(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def register_defense(name: str):
    """Class decorator registering a :class:`Defense` subclass under ``name`` (kebab-case)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RegistryError(
            f"defense name {name!r} is not kebab-case (lowercase letters, digits and '-')"
        )

    def decorator(cls: D) -> D:
        if not (isinstance(cls, type) and issubclass(cls, Defense)):
            raise RegistryError(f"@register_defense({name!r}) must decorate a Defense subclass")
        src = _source_of(cls)
        prev = _REGISTRY.get(name)
        if prev is not None and prev.source != src:
            raise RegistryError(
                f"defense name {name!r} is registered twice: by {prev.source} "
                f"(package {prev.package}) and by {src}"
            )
        cls.name = name
        pkg = _CURRENT_PACKAGE[-1] if _CURRENT_PACKAGE else _package_of_module(cls.__module__)
        _REGISTRY[name] = _Entry(cls=cls, source=src, package=pkg)
        return cls

    return decorator


def _package_of_module(module: str) -> str:
    top = module.split(".")[0]
    if top in ("defenses", "bench"):
        return "certbench"
    return top


def _import_plugin(module: str, label: str, package: str) -> None:
    _CURRENT_PACKAGE.append(package)
    try:
        importlib.import_module(module)
    except RegistryError:
        raise
    except Exception as exc:  # a broken plugin must not take the others down
        _BROKEN[label] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"certbench: defense plugin {label!r} ({module}) failed to load: "
            f"{type(exc).__name__}: {exc}",
            RuntimeWarning,
            stacklevel=3,
        )
    finally:
        _CURRENT_PACKAGE.pop()


def load_plugins(*, force: bool = False) -> None:
    """Import every module of the ``certbench.defenses`` entry-point group (once)."""
    global _LOADED
    if _LOADED and not force:
        return
    _LOADED = True
    autoload = os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")
    seen: set[str] = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        module = ep.value.split(":")[0].strip()
        if module in seen:
            continue
        builtin = module in BUILTIN_MODULES
        if not builtin and not autoload:
            continue
        seen.add(module)
        dist = getattr(ep, "dist", None)
        package = dist.metadata["Name"] if dist is not None else _package_of_module(module)
        _import_plugin(module, ep.name, package)
    # Built-ins also load when certbench runs from a source tree without being installed.
    for module in BUILTIN_MODULES:
        if module not in seen:
            _import_plugin(module, module.rsplit(".", 1)[-1].replace("_", "-"), "certbench")


def broken_plugins() -> dict[str, str]:
    """Entry points that failed to import: name -> error message."""
    load_plugins()
    return dict(_BROKEN)


def list_defenses(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a glob ``pattern`` (e.g. ``"*dp*"``)."""
    load_plugins()
    names = sorted(_REGISTRY)
    if pattern:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def get_defense_class(name: str) -> type[Defense]:
    """The class registered under ``name``; raises :class:`RegistryError` listing known names."""
    load_plugins()
    try:
        return _REGISTRY[name].cls
    except KeyError:
        hint = ""
        if name in _BROKEN:
            hint = f" (its plugin failed to load: {_BROKEN[name]})"
        raise RegistryError(
            f"unknown defense {name!r}{hint}; known defenses: {', '.join(sorted(_REGISTRY))}"
        ) from None


def defense_package(name: str) -> str:
    """The distribution that provides ``name`` (``certbench`` for built-ins)."""
    get_defense_class(name)
    return _REGISTRY[name].package


def create_defense(name: str, /, **params: Any) -> Defense:
    """Instantiate the defense ``name`` with keyword hyper-parameters (unknown ones raise)."""
    cls = get_defense_class(name)
    allowed = cls.param_names()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"defense {name!r} has no parameter(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed) or '(none)'}"
        )
    try:
        return cls(**params)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"defense {name!r}: {exc}") from exc
