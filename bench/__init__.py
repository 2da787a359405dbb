"""certbench: benchmark defenses against adversarial examples side by side.

Packages: :mod:`bench` (the harness core), :mod:`defenses` (one module per defense) and
:mod:`attacks` (expectation-over-noise wrapper and one adapter per attack library).

``bench.evaluate(model, dataset=..., defense=...)`` benchmarks a model you bring
(:mod:`bench.api`); it is imported on first use, so ``import bench`` stays light (no torch).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "evaluate"]


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        from bench.api import evaluate

        return evaluate
    raise AttributeError(f"module 'bench' has no attribute {name!r}")
