"""The generic registry (defenses, models, attacks, datasets, noises): registration in both
decorator forms, lookup, errors, entry-point plugins."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import numpy as np
import pytest

from bench import registry
from bench.errors import ConfigError, RegistryError
from defenses.base import Defense


@pytest.fixture
def clean_registry(monkeypatch):
    """Isolated registries (the real ones are restored after the test)."""
    for reg in registry.REGISTRIES.values():
        reg.load()
        monkeypatch.setattr(reg, "_entries", dict(reg._entries))
        monkeypatch.setattr(reg, "_broken", {})
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
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda group=None: eps if group == "certbench.defenses" else [],
    )
    monkeypatch.setattr(registry.DEFENSES, "_loaded", False)
    with pytest.warns(RuntimeWarning, match="fake-bad"):
        names = registry.list_defenses()
    assert "fake-plugin" in names and "undefended" in names
    assert registry.defense_package("fake-plugin") == "fake-dist"
    assert "defense fake-bad" in registry.broken_plugins()
    with pytest.raises(RegistryError, match="failed to load"):
        registry.get_defense_class("fake-bad")
    assert registry.create_defense("fake-plugin", k=3).get_params() == {"k": 3}


def test_autoload_can_be_disabled(clean_registry, monkeypatch):
    _fake_plugin_module(monkeypatch, "fake_plugin_off", "fake-off")
    eps = [_FakeEP("fake-off", "fake_plugin_off", "fake-dist")]
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda group=None: eps if group == "certbench.defenses" else [],
    )
    monkeypatch.setattr(registry.DEFENSES, "_loaded", False)
    monkeypatch.setenv(registry.AUTOLOAD_ENV, "1")
    names = registry.list_defenses()
    assert "fake-off" not in names
    assert "undefended" in names  # built-ins still load


def test_bare_decorator_takes_the_class_name_attribute(clean_registry):
    """timm-style ``@register_defense`` with no call: the name comes from ``name``."""

    @registry.register_defense
    class Bare(Defense):
        name = "bare-test"

        def __init__(self, *, k: int = 1) -> None:
            self.k = k

    assert registry.get_defense_class("bare-test") is Bare
    assert registry.create_defense("bare-test", k=2).get_params() == {"k": 2}


def test_bare_decorator_without_a_name_says_how_to_fix(clean_registry):
    with pytest.raises(RegistryError, match=r"set the class attribute name"):

        @registry.register_defense
        class Nameless(Defense):
            def __init__(self) -> None:
                pass


def test_explicit_name_is_set_on_the_class(clean_registry):
    @registry.register_defense("explicit-test")
    class Explicit(Defense):
        def __init__(self) -> None:
            pass

    assert Explicit.name == "explicit-test"


def test_register_defense_rejects_a_non_defense(clean_registry):
    with pytest.raises(RegistryError, match="Defense subclass"):

        @registry.register_defense("not-a-defense")
        class NotADefense:
            pass


def test_model_factories_bare_and_named(clean_registry):
    from bench.models import create_model

    @registry.register_model
    def tiny_net(input_shape, num_classes):
        import torch.nn as nn

        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))

    @registry.register_model("tiny-named")
    def _other(input_shape, num_classes):
        return tiny_net(input_shape, num_classes)

    assert {"tiny-net", "tiny-named"} <= set(registry.MODELS.names())
    assert create_model("tiny-net", input_shape=(1, 4, 4), num_classes=3)(
        __import__("torch").zeros(2, 1, 4, 4)
    ).shape == (2, 3)
    with pytest.raises(RegistryError, match=r"unknown model 'nope'; known models: .*tiny-net"):
        create_model("nope", input_shape=(1, 4, 4), num_classes=3)


def test_duplicate_model_raises_naming_both(clean_registry):
    @registry.register_model("dup-model")
    def first(input_shape, num_classes):
        raise NotImplementedError

    with pytest.raises(RegistryError, match=r"model name 'dup-model' is registered twice.*first"):

        @registry.register_model("dup-model")
        def second(input_shape, num_classes):
            raise NotImplementedError


def test_every_kind_uses_one_registry_class():
    kinds = {kind: reg for kind, reg in registry.REGISTRIES.items()}
    assert set(kinds) == {"defense", "model", "attack", "dataset", "noise"}
    assert all(isinstance(r, registry.Registry) for r in kinds.values())
    assert {r.group for r in kinds.values()} == {
        "certbench.defenses",
        "certbench.models",
        "certbench.attacks",
        "certbench.datasets",
        "certbench.noises",
    }


def test_attack_names_are_library_colon_name(clean_registry):
    from attacks.base import get_attack, register_attack

    @register_attack("mylib", "fancy-pgd", norms=("linf",))
    def fancy(defense, x, y, *, norm, eps, seed):
        return x

    assert get_attack("mylib", "fancy-pgd").fn is fancy
    with pytest.raises(RegistryError, match="library:name"):
        register_attack("MyLib", "x", norms=("linf",))(fancy)


def test_builtins_come_from_the_entry_point_list_only():
    """No hand-kept list: every built-in component's module is named in pyproject.toml."""
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())[
        "project"
    ]
    groups = project["entry-points"]
    for kind, reg in registry.REGISTRIES.items():
        modules = set(groups.get(reg.group, {}).values())
        for name in reg.names():
            if reg.package(name) == "certbench":
                module = reg.entry(name).source.split(":")[0]
                assert module in modules, f"{kind} {name} comes from unlisted {module}"
