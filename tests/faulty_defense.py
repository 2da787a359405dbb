"""A defense whose process dies (SIGKILL) while it trains or evaluates, for fault tests.

Not a test module: importing it registers the defense, which ``tests/test_jobs.py`` does for
the duration of a test (and then removes it from the registry). The workers of ``certbench
run --jobs N`` import this module because the parent has a component registered from it
(:func:`bench.workers._extra_modules`).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from bench.registry import register_defense
from defenses.undefended import Undefended


@register_defense
class DiesOnce(Undefended):
    """The undefended baseline, except that the first ``deaths`` processes that evaluate test
    examples from index 100 (the second shard of the test set), or train when ``where`` is
    ``"train"``, kill themselves. ``marker_dir`` counts the deaths across processes."""

    name = "test-dies"

    def __init__(self, *, marker_dir: str = "", deaths: int = 1, where: str = "predict") -> None:
        self.marker_dir = marker_dir
        self.deaths = deaths
        self.where = where

    def _maybe_die(self) -> None:
        if not self.marker_dir:
            return
        died = sorted(Path(self.marker_dir).glob("died-*"))
        if len(died) < self.deaths:
            (Path(self.marker_dir) / f"died-{len(died)}-{os.getpid()}").touch()
            os.kill(os.getpid(), signal.SIGKILL)

    def training_loss(self, x, y, progress):  # type: ignore[no-untyped-def]
        if self.where == "train":
            self._maybe_die()
        return super().training_loss(x, y, progress)

    def predict(self, x, *, seed=0, indices=None, batch_size=None):  # type: ignore[no-untyped-def]
        if self.where == "predict" and indices is not None and int(indices[0]) == 100:
            self._maybe_die()
        return super().predict(x, seed=seed, indices=indices, batch_size=batch_size)
