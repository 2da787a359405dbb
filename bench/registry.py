"""One registry for every kind of component: defenses, models, attack adapters, datasets and
noise distributions.

Each kind is a :class:`Registry` bound to an entry-point group (timm's decorator registry,
discovered the way pluggy finds plugins):

============  ==========================  ===============================================
kind          entry-point group           what is registered
============  ==========================  ===============================================
defense       ``certbench.defenses``      a :class:`defenses.base.Defense` subclass
model         ``certbench.models``        a factory ``f(input_shape, num_classes, **kw)``
attack        ``certbench.attacks``       an adapter ``f(defense, x, y, *, norm, eps, ...)``
dataset       ``certbench.datasets``      a :class:`bench.data.DatasetFormat`
noise         ``certbench.noises``        a sampler ``f(shape, *, dtype, device, generator)``
============  ==========================  ===============================================

Built-ins and third-party plugins are found the same way: loading an entry point imports its
module, and importing the module runs its decorators. certbench's own ``pyproject.toml`` is
the only list of built-ins. A plugin declares, in its own ``pyproject.toml``::

    [project.entry-points."certbench.defenses"]
    my-defense = "my_package.my_defense"

Both decorator forms work, as in timm::

    @register_defense                  # name from the class attribute ``name``
    class MyDefense(Defense):
        name = "my-defense"

    @register_defense("my-defense")    # explicit name (also sets ``MyDefense.name``)
    class MyDefense(Defense): ...

    @register_model                    # a factory: name from the function, '_' -> '-'
    def my_net(input_shape, num_classes): ...

Rules, the same for every kind: names are kebab-case (attacks: ``library:name``); a name
registered twice by different objects raises, naming both sources; an unknown name raises
listing the known ones; a plugin that fails to import is reported by name
(:meth:`Registry.broken`, a warning) and does not take the others down. Setting
``CERTBENCH_DISABLE_PLUGIN_AUTOLOAD=1`` skips third-party entry points (built-ins still load).
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.metadata
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

from bench.errors import ConfigError, RegistryError

AUTOLOAD_ENV = "CERTBENCH_DISABLE_PLUGIN_AUTOLOAD"
DISTRIBUTION = "certbench"
KEBAB_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
ATTACK_NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*:[a-z0-9]+(-[a-z0-9]+)*$")
_ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered component: the object, where it was defined, which distribution ships it."""

    name: str
    obj: T
    source: str  # "module:qualname"
    package: str


@dataclass(frozen=True)
class _Plugin:
    """One entry point to import: its name, module and providing distribution."""

    name: str
    module: str
    package: str


def _source_of(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"


@lru_cache(maxsize=1)
def _source_tree_entry_points() -> dict[str, tuple[tuple[str, str], ...]] | None:
    """certbench's own entry points read from ``pyproject.toml`` when running from a source
    tree (a clone, an editable install): the tree, not possibly stale installed metadata,
    decides which built-ins exist. ``None`` when certbench runs from an installed wheel."""
    path = _ROOT / "pyproject.toml"
    if not (path.is_file() and (_ROOT / "bench" / "registry.py").is_file()):
        return None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        project = tomllib.loads(path.read_text(encoding="utf-8")).get("project", {})
    except (OSError, ValueError):
        return None
    if project.get("name") != DISTRIBUTION:
        return None
    groups = project.get("entry-points", {})
    return {g: tuple((str(k), str(v)) for k, v in eps.items()) for g, eps in groups.items()}


def _plugins(group: str) -> Iterator[_Plugin]:
    """The entry points of ``group``: certbench's own first, then third-party ones."""
    tree = _source_tree_entry_points()
    if tree is not None:
        for name, value in tree.get(group, ()):
            yield _Plugin(name, value.split(":")[0].strip(), DISTRIBUTION)
    for ep in importlib.metadata.entry_points(group=group):
        dist = getattr(ep, "dist", None)
        package = dist.metadata["Name"] if dist is not None else ""
        if tree is not None and package == DISTRIBUTION:
            continue  # the source tree's list wins over the installed copy of it
        yield _Plugin(ep.name, ep.value.split(":")[0].strip(), package or "?")


class Registry(Generic[T]):
    """Named components of one ``kind``, discovered through the entry-point ``group``.

    Args:
        kind: what is registered, for messages (``"defense"``).
        group: the entry-point group that lists the modules to import.
        check: optional ``check(obj)`` raising :class:`RegistryError` for an object of the
            wrong type (e.g. a class that is not a Defense).
        name_re: the pattern names must match; ``name_rule`` describes it in messages.
    """

    def __init__(
        self,
        kind: str,
        group: str,
        *,
        check: Callable[[Any], None] | None = None,
        name_re: re.Pattern[str] = KEBAB_RE,
        name_rule: str = "kebab-case (lowercase letters, digits and '-')",
    ) -> None:
        self.kind = kind
        self.group = group
        self._check = check
        self._name_re = name_re
        self._name_rule = name_rule
        self._entries: dict[str, Entry[T]] = {}
        self._broken: dict[str, str] = {}
        self._loaded = False
        self._lock = threading.RLock()
        self._importing: list[str] = []  # distribution of the plugin being imported

    # ------------------------------------------------------------------ registration
    @overload
    def register(self, arg: str, /) -> Callable[[T], T]: ...
    @overload
    def register(self, arg: T, /) -> T: ...
    def register(self, arg: Any = None, /) -> Any:
        """Decorator: ``@register`` (name from the object) or ``@register("name")``."""
        if isinstance(arg, str) or arg is None:
            name = arg
            if name is not None:
                self._check_name(name)

            def decorator(obj: T) -> T:
                self.add(obj, name)
                return obj

            return decorator
        self.add(arg, None)
        return arg

    def _check_name(self, name: Any) -> None:
        if not isinstance(name, str) or not self._name_re.match(name):
            raise RegistryError(f"{self.kind} name {name!r} is not {self._name_rule}")

    def _derived_name(self, obj: Any) -> str:
        """A class's own ``name`` attribute, an instance's ``name``, or a function's
        ``__name__`` with ``_`` -> ``-``."""
        if isinstance(obj, type):
            name = vars(obj).get("name")
            if not name:
                raise RegistryError(
                    f"{_source_of(obj)}: set the class attribute name = '<{self.kind}-name>' "
                    f"or register it as @register_{self.kind}('<{self.kind}-name>')"
                )
            return name
        name = getattr(obj, "name", None)
        if isinstance(name, str) and name:
            return name
        fn_name = getattr(obj, "__name__", None)
        if not fn_name:
            raise RegistryError(f"cannot derive a {self.kind} name from {obj!r}; pass one")
        return fn_name.replace("_", "-")

    def add(self, obj: T, name: str | None = None, *, source: str | None = None) -> str:
        """Register ``obj`` under ``name`` (derived from the object when ``None``).

        ``source`` names where it was defined (default: the object's module and qualname);
        registering the same name again from the same source is a no-op (a re-import).
        """
        if self._check is not None:
            self._check(obj)
        if name is None:
            name = self._derived_name(obj)
        self._check_name(name)
        source = source or _source_of(obj)
        with self._lock:
            prev = self._entries.get(name)
            if prev is not None and prev.obj is not obj and prev.source != source:
                raise RegistryError(
                    f"{self.kind} name {name!r} is registered twice: by {prev.source} "
                    f"(package {prev.package}) and by {source}"
                )
            package = _package_of(source)
            if package != DISTRIBUTION and self._importing:
                # the plugin being imported; certbench modules it imports stay certbench's
                package = self._importing[-1]
            if isinstance(obj, type):
                obj.name = name  # type: ignore[attr-defined]
            self._entries[name] = Entry(name=name, obj=obj, source=source, package=package)
        return name

    # ------------------------------------------------------------------ discovery
    def load(self, *, force: bool = False) -> None:
        """Import every module of the entry-point group (once; ``force`` re-scans)."""
        with self._lock:
            if self._loaded and not force:
                return
            self._loaded = True
            autoload = os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes")
            seen: set[str] = set()
            for plugin in _plugins(self.group):
                if plugin.module in seen or (plugin.package != DISTRIBUTION and not autoload):
                    continue
                seen.add(plugin.module)
                self._import(plugin)

    def _import(self, plugin: _Plugin) -> None:
        self._importing.append(plugin.package)
        try:
            importlib.import_module(plugin.module)
        except RegistryError:
            raise  # a duplicate name is the plugin author's error to fix, not to hide
        except Exception as exc:  # a broken plugin must not take the others down
            message = f"{type(exc).__name__}: {exc}"
            self._broken[plugin.name] = message
            warnings.warn(
                f"certbench: {self.kind} plugin {plugin.name!r} ({plugin.module}) failed to "
                f"load: {message}",
                RuntimeWarning,
                stacklevel=4,
            )
        finally:
            self._importing.pop()

    # ------------------------------------------------------------------ lookup
    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted registered names, optionally filtered by a glob ``pattern``."""
        self.load()
        names = sorted(self._entries)
        return [n for n in names if fnmatch.fnmatchcase(n, pattern)] if pattern else names

    def entry(self, name: str) -> Entry[T]:
        """The entry of ``name``; raises :class:`RegistryError` listing the known names."""
        self.load()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            hint = ""
            if isinstance(name, str) and name in self._broken:
                hint = f" (its plugin failed to load: {self._broken[name]})"
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise RegistryError(
                f"unknown {self.kind} {name!r}{hint}; known {self.kind}s: {known}"
            ) from None

    def get(self, name: str) -> T:
        """The object registered under ``name``."""
        return self.entry(name).obj

    def package(self, name: str) -> str:
        """The distribution that provides ``name`` (``certbench`` for built-ins)."""
        return self.entry(name).package

    def broken(self) -> dict[str, str]:
        """Entry points of this group that failed to import: name -> error message."""
        self.load()
        return dict(self._broken)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, group={self.group!r}, {len(self._entries)} entries)"


def _package_of(source: str) -> str:
    top = source.split(".")[0].split(":")[0]
    return DISTRIBUTION if top in ("bench", "defenses", "attacks") else top or "?"


# ---------------------------------------------------------------------------- the five kinds


def _check_defense(obj: Any) -> None:
    from defenses.base import Defense

    if not (isinstance(obj, type) and issubclass(obj, Defense)):
        raise RegistryError(f"@register_defense must decorate a Defense subclass, not {obj!r}")


def _check_callable(kind: str) -> Callable[[Any], None]:
    def check(obj: Any) -> None:
        if not callable(obj):
            raise RegistryError(f"@register_{kind} must decorate a callable, not {obj!r}")

    return check


DEFENSES: Registry[Any] = Registry("defense", "certbench.defenses", check=_check_defense)
MODELS: Registry[Any] = Registry("model", "certbench.models", check=_check_callable("model"))
ATTACKS: Registry[Any] = Registry(
    "attack",
    "certbench.attacks",
    name_re=ATTACK_NAME_RE,
    name_rule="'library:name' with kebab-case parts (e.g. 'torchattacks:pgd')",
)
DATASETS: Registry[Any] = Registry("dataset", "certbench.datasets")
NOISES: Registry[Any] = Registry("noise", "certbench.noises", check=_check_callable("noise"))
"""Standard noise distributions of :class:`bench.noise.NoiseLayer` (see :mod:`bench.noise`)."""

REGISTRIES: dict[str, Registry[Any]] = {
    r.kind: r for r in (DEFENSES, MODELS, ATTACKS, DATASETS, NOISES)
}

register_defense = DEFENSES.register
register_model = MODELS.register
register_dataset = DATASETS.register
register_noise = NOISES.register


def load_plugins(*, force: bool = False) -> None:
    """Import every entry point of every group (once)."""
    for reg in REGISTRIES.values():
        reg.load(force=force)


def broken_plugins() -> dict[str, str]:
    """Plugins of any group that failed to import: ``"kind name"`` -> error message."""
    return {f"{r.kind} {n}": msg for r in REGISTRIES.values() for n, msg in r.broken().items()}


# ---------------------------------------------------------------------------- defenses


def list_defenses(pattern: str | None = None) -> list[str]:
    """Sorted registered defense names, optionally filtered by a glob (e.g. ``"*dp*"``)."""
    return DEFENSES.names(pattern)


def get_defense_class(name: str) -> Any:
    """The Defense class registered under ``name``."""
    return DEFENSES.get(name)


def defense_package(name: str) -> str:
    """The distribution that provides defense ``name``."""
    return DEFENSES.package(name)


def create_defense(name: str, /, **params: Any) -> Any:
    """Instantiate defense ``name`` with keyword hyper-parameters (unknown ones raise)."""
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
