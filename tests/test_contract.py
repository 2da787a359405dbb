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
