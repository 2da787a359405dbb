"""The layout rules of DESIGN.md, checked on the source: no import cycles inside ``bench/``
(imports inside functions count), executors never import each other, and the core never
branches on a component's registered name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bench.registry import REGISTRIES

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(BENCH.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every ``bench`` module imported anywhere in ``path`` (module level or in functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            # the longest known module that t names (``from bench.x import y`` -> bench.x)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(path, name, known) - {"bench"} for name, path in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_cycle_finder_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_bench():
    graph = _graph()
    assert graph.get("bench.pipeline"), "import scan found nothing"
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_executors_never_import_each_other():
    graph = _graph()
    executors = {n for n in graph if n.startswith("bench.executors.")}
    assert {"bench.executors.local", "bench.executors.ray_executor"} <= executors
    for name in executors:
        assert not (graph[name] & (executors | {"bench.executors"})), name


def _registered_names() -> set[str]:
    names: set[str] = set()
    # Noise kinds are left out: "gaussian"/"laplace" name distributions whose maths the core
    # implements on purpose (the engine's fused Gaussian sampling, PixelDP's two mechanisms).
    for kind in ("defense", "model", "attack", "dataset"):
        reg = REGISTRIES[kind]
        names.update(n for n in reg.names() if reg.package(n) == "certbench")
    return names


@pytest.mark.parametrize("path", sorted(BENCH.rglob("*.py")), ids=lambda p: p.name)
def test_the_core_never_compares_against_a_component_name(path: Path):
    """``if args.defense == "wong-kolter"`` and the like: quirks live in the component."""
    names = _registered_names()
    assert "wong-kolter" in names and "cnn" in names
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                values = (
                    [side] if not isinstance(side, ast.Tuple | ast.List | ast.Set) else side.elts
                )
                for v in values:
                    if isinstance(v, ast.Constant) and v.value in names:
                        pytest.fail(f"{path.name}:{node.lineno} compares against {v.value!r}")
