"""The defense registry: registration, lookup, errors, entry-point plugins."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest

from bench import registry
from bench.errors import ConfigError, RegistryError
from defenses.base import Defense


@pytest.fixture
def clean_registry(monkeypatch):
    """An isolated registry (the real one is restored after the test)."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_BROKEN", {})
    monkeypatch.setattr(registry, "_LOADED", True)
    return registry


def test_builtins_are_registered():
    names = registry.list_defenses()
    assert "undefended" in names
    for name in names:
        assert registry.get_defense_class(name).name == name


def test_unknown_name_lists_known(clean_registry):
    with pytest.raises(
        RegistryError, match=r"unknown defense 'nope'.*known defenses: .*undefended"
    ):
        registry.create_defense("nope")


def test_unknown_param_names_allowed(clean_registry):
    with pytest.raises(ConfigError, match=r"no parameter\(s\) bogus"):
        registry.create_defense("undefended", bogus=1)


def test_param_called_name_is_a_config_error(clean_registry):
    """A record or spec whose params contain 'name' must not collide with the defense name."""
    with pytest.raises(ConfigError, match=r"no parameter\(s\) name"):
        registry.create_defense("undefended", name=0)


def test_duplicate_name_raises_naming_both(clean_registry):
    @registry.register_defense("dup-test")
    class A(Defense):
        def __init__(self) -> None:
            pass

    with pytest.raises(RegistryError, match=r"registered twice: by .*:.*A .* and by .*B"):

        @registry.register_defense("dup-test")
        class B(Defense):
            def __init__(self) -> None:
                pass


def test_bad_names_rejected():
    for bad in ("Bad_Name", "x y", "", "-lead"):
        with pytest.raises(RegistryError, match="kebab-case"):
            registry.register_defense(bad)


def test_glob_filter():
    assert registry.list_defenses("undef*") == ["undefended"]


class _FakeEP:
    def __init__(self, name: str, value: str, dist_name: str) -> None:
        self.name, self.value = name, value
        self.dist = types.SimpleNamespace(metadata={"Name": dist_name})


def _fake_plugin_module(monkeypatch, modname: str, defense_name: str, *, broken: bool = False):
    src = (
        "raise ImportError('plugin is broken')\n"
        if broken
        else "from bench.registry import register_defense\n"
        "from defenses.base import Defense\n"
        f"@register_defense({defense_name!r})\n"
        "class Plug(Defense):\n"
        "    def __init__(self, *, k: int = 1):\n"
        "        self.k = k\n"
    )

    class Finder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name != modname:
                return None
            import importlib.util

            class Loader:
                def create_module(self, spec):
                    return None

                def exec_module(self, module):
                    exec(src, module.__dict__)

            return importlib.util.spec_from_loader(name, Loader())

    monkeypatch.setattr(sys, "meta_path", [Finder, *sys.meta_path])


def test_entry_point_plugin_discovered_and_broken_one_reported(clean_registry, monkeypatch):
    _fake_plugin_module(monkeypatch, "fake_plugin_ok", "fake-plugin")
    _fake_plugin_module(monkeypatch, "fake_plugin_bad", "fake-bad", broken=True)
    eps = [
        _FakeEP("fake-plugin", "fake_plugin_ok", "fake-dist"),
        _FakeEP("fake-bad", "fake_plugin_bad", "bad-dist"),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: eps)
    monkeypatch.setattr(registry, "_LOADED", False)
    with pytest.warns(RuntimeWarning, match="fake-bad"):
        names = registry.list_defenses()
    assert "fake-plugin" in names and "undefended" in names
    assert registry.defense_package("fake-plugin") == "fake-dist"
    assert "fake-bad" in registry.broken_plugins()
    with pytest.raises(RegistryError, match="failed to load"):
        registry.get_defense_class("fake-bad")
    assert registry.create_defense("fake-plugin", k=3).get_params() == {"k": 3}


def test_autoload_can_be_disabled(clean_registry, monkeypatch):
    _fake_plugin_module(monkeypatch, "fake_plugin_off", "fake-off")
    eps = [_FakeEP("fake-off", "fake_plugin_off", "fake-dist")]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: eps)
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.setenv(registry.AUTOLOAD_ENV, "1")
    names = registry.list_defenses()
    assert "fake-off" not in names
    assert "undefended" in names  # built-ins still load
