"""Pinned facts: each documented framework behaviour still holds (``klparity.engine.pinned``), one test per fact."""

from __future__ import annotations

import pytest

from klparity.apis import pinning
from klparity.apis.pinning import FACTS
from klparity.engine.pinned import check
from klparity.plugin import selection

pytestmark = pytest.mark.equivalence


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test per fact of the selected frameworks (``--klparity-frameworks``)."""
    if metafunc.function.__name__ == "test_pinned_fact":
        frameworks = selection(metafunc.config).frameworks
        metafunc.parametrize("name", [n for n, f in FACTS.items() if f.framework in frameworks])


def test_pinned_fact(name: str) -> None:
    """The probe's measurement equals the pinned value; otherwise the message says what changed, and where."""
    f = FACTS[name]
    reason = pinning.missing(f)
    if reason:
        pytest.skip(reason)
    ok, _, message = check(f)
    if not ok:
        pytest.fail(message, pytrace=False)
