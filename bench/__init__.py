"""certbench: benchmark defenses against adversarial examples side by side.

Packages: :mod:`bench` (the harness core), :mod:`defenses` (one module per defense) and
:mod:`attacks` (expectation-over-noise wrapper and one adapter per attack library).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
