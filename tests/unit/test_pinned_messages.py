"""A pinned fact that stops holding says which fact, the pinned and the new value, and the version."""

from __future__ import annotations

import pytest

from klparity.apis.pinning import FACTS
from klparity.engine.pinned import check


def test_a_fact_that_stops_holding_says_which_old_new_and_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inject a change (torch's default reduction becomes 'batchmean', silently): the message stands alone."""
    torch = pytest.importorskip("torch")
    name = "torch.default_reduction_mean"
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
                 "'F.kl_div': 'numel'", "now: ", "'F.kl_div': 'B'",
                 "repro: python -m klparity.engine.pinned"):  # fmt: skip
        assert part in message, message
