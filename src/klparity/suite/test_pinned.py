"""Pinned facts: each documented framework behaviour still holds (``klparity.pinned``), one test per fact."""

from __future__ import annotations

import pytest

from klparity.frameworks import REGISTRY
from klparity.pinned import FACTS, check
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
    if not REGISTRY[f.framework].available():
        pytest.skip(REGISTRY[f.framework].missing_reason())
    ok, _, message = check(f)
    if not ok:
        pytest.fail(message, pytrace=False)


# parametrized by the fact's name so that its id names the framework, and it runs in torch's worker
@pytest.mark.parametrize("name", ["torch.default_reduction_mean"])
def test_a_fact_that_stops_holding_says_which_old_new_and_version(
    name: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """Inject a change (torch's default reduction becomes 'batchmean', silently): the message stands alone."""
    if "torch" not in selection(request.config).frameworks:
        pytest.skip("torch is not among --klparity-frameworks")
    if not REGISTRY["torch"].available():
        pytest.skip(REGISTRY["torch"].missing_reason())
    torch = pytest.importorskip("torch")
    original = torch.nn.functional.kl_div

    def batchmean_default(inp: object, tgt: object, *a: object, **k: object) -> object:
        k.setdefault("reduction", "batchmean")
        return original(inp, tgt, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "kl_div", batchmean_default)
    ok, got, message = check(FACTS[name])
    assert not ok
    # nn.KLDivLoss passes its own default ('mean') explicitly, so only the function changed
    assert got.value["F.kl_div"] == "B" and got.value["nn.KLDivLoss"] == "numel"
    for part in ("'torch.default_reduction_mean' NO LONGER HOLDS", f"torch {torch.__version__}", "pinned: ",
                 "'F.kl_div': 'numel'", "now: ", "'F.kl_div': 'B'", "repro: python -m klparity.pinned"):  # fmt: skip
        assert part in message, message
