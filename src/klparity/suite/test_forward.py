"""Forward parity: each framework API against the oracle, per case, dtype, device and layout."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from klparity.engine.forward import Cell
from klparity.model import CheckResult
from klparity.plugin import assert_cell

pytestmark = pytest.mark.equivalence


def test_forward(
    kl_cell: Cell, klparity_run: Callable[[Cell], list[CheckResult]], klparity_seed: int
) -> None:
    """Every reduction of the API matches its documented formula and the exact KL (or a documented gap)."""
    assert_cell(kl_cell, klparity_seed, klparity_run(kl_cell))
