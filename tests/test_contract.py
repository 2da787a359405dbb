"""The Defense contract, checked on every registered defense (built-ins and plugins alike).

A new defense is tested here with no edit to this file: the parametrisation is over
``list_defenses()`` × the checks of :mod:`bench.testing`.
"""

from __future__ import annotations

import pytest

from bench.registry import get_defense_class, list_defenses
from bench.testing import CHECKS, check_defense

CASES = [(name, chk) for name in list_defenses() for chk in CHECKS]


@pytest.mark.parametrize(("name", "check"), CASES, ids=[f"{n}-{c.__name__}" for n, c in CASES])
def test_contract(name, check):
    check(get_defense_class(name))


def test_check_defense_catches_a_broken_defense():
    """The checks can fail: a defense that ignores its parameter is rejected."""
    from defenses.base import Defense

    class Broken(Defense):
        name = "broken-test"

        def __init__(self, *, k: int = 1) -> None:
            self.k = 2 * k  # not stored unchanged

    with pytest.raises(AssertionError, match="check_params_round_trip"):
        check_defense(Broken)


def test_check_defense_catches_a_fake_randomized_defense():
    from defenses.base import Defense

    class FakeNoise(Defense):
        name = "fake-noise-test"
        randomized = True

        def __init__(self) -> None:
            pass

    with pytest.raises(AssertionError, match="check_randomness"):
        check_defense(FakeNoise)


def test_check_defense_catches_a_false_shared_certificate():
    """A defense that says one certify call serves every norm, but whose certificate depends
    on the norm asked for, is rejected (the runner would score a cell from another norm's
    certificate)."""
    import torch

    from bench.testing import check_shared_certificate
    from defenses.base import Certificate
    from defenses.undefended import Undefended

    class Claims(Undefended):
        name = "claims-shared-test"
        certifies = ("l2", "linf")

        def certify(self, x, *, norm, seed=0, indices=None, batch_size=None, radii=None,
                    labels=None):  # fmt: skip
            pred = self.predict(x, seed=seed)
            r = torch.full(pred.shape, 0.5 if norm == "l2" else 0.1, dtype=torch.float64)
            return Certificate(labels=pred, radii={"l2": r, "linf": r / 2}, bound="test")

        def shared_certificate_norms(self):
            return ("l2", "linf")

    with pytest.raises(AssertionError, match="reports another l2 radius"):
        check_shared_certificate(Claims)

    class ClaimsUncertified(Undefended):
        name = "claims-uncertified-test"

        def shared_certificate_norms(self):
            return ("l2", "linf")

    with pytest.raises(AssertionError, match="does not certify"):
        check_shared_certificate(ClaimsUncertified)
