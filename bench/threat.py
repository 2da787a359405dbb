"""Threat-model geometry: the norms certbench knows.

(The issue-15 redesign moves projection onto the ball ∩ [0, 1], random starts, radius
conversion and the one PGD core here.)
"""

from __future__ import annotations

NORMS: tuple[str, ...] = ("l1", "l2", "linf")
"""Threat-model norms, in pixel units with pixels in [0, 1]."""
