"""Gradient parity: d(loss)/d(student and teacher logits) of each API against float64 references."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from klparity.engine.forward import Cell
from klparity.engine.gradients import grad_failure_message
from klparity.model import CheckResult

pytestmark = pytest.mark.equivalence


def test_gradients(
    kl_grad_cell: Cell, klparity_grad_run: Callable[[Cell], list[CheckResult]], klparity_seed: int
) -> None:
    """Each reduction's gradients match the API's formula, and the exact gradient or a documented gap."""
    results = klparity_grad_run(kl_grad_cell)
    if not all(r.ok for r in results):
        pytest.fail(grad_failure_message(kl_grad_cell, klparity_seed, results), pytrace=False)
