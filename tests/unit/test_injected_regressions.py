"""The suite must fail on plausible framework regressions: each is injected by patching the framework.

Each test runs the quick-tier cells of one framework and dtype with a patched framework function and
asserts that at least one check fails, with a message that names the symptom. A control test runs
the same cells unpatched and asserts that they all pass, so the failures come from the patch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from klparity.engine import grid
from klparity.engine.forward import run_cell
from klparity.frameworks import REGISTRY
from klparity.model import CheckResult


def _run(framework: str, dtype: str) -> list[CheckResult]:
    sel = grid.Selection(frameworks=(framework,), dtypes=(dtype,), devices=("cpu",))
    out: list[CheckResult] = []
    for cell in grid.cells(sel):
        if cell.layout == "contiguous" and grid.skip_reason(cell, 0) is None:
            out += run_cell(REGISTRY[framework], cell)
    return out


def _problems(results: list[CheckResult]) -> str:
    return "\n".join(p for r in results if not r.ok for p in r.problems)


@pytest.fixture
def torch_fn(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Callable[..., Any]], None]]:
    torch = pytest.importorskip("torch")
    original = torch.nn.functional.kl_div

    def install(make: Callable[..., Any]) -> None:
        # nn.KLDivLoss.forward calls torch.nn.functional.kl_div through the module attribute,
        # so one patch covers both entry points.
        monkeypatch.setattr(torch.nn.functional, "kl_div", lambda *a, **k: make(original, torch, *a, **k))

    yield install


@pytest.mark.parametrize("framework,dtype", [("torch", "float32"), ("torch", "float64"), ("tensorflow", "float32")])
def test_control_unpatched_cells_pass(framework: str, dtype: str) -> None:
    if not REGISTRY[framework].available():
        pytest.skip(REGISTRY[framework].missing_reason())
    results = _run(framework, dtype)
    assert results and all(r.ok for r in results), _problems(results)


def test_float32_drift_of_1e4_relative_fails(torch_fn: Callable[..., None]) -> None:
    def drift(orig: Any, torch: Any, *a: Any, **k: Any) -> Any:
        out = orig(*a, **k)
        return out * (1 + 1e-4) if out.dtype == torch.float32 else out

    torch_fn(drift)
    results = _run("torch", "float32")
    failed = [r for r in results if not r.ok]
    assert failed, "a 1e-4 relative drift in float32 went unnoticed"
    assert "exceeds tolerance" in _problems(results)


def test_float64_computed_through_float32_fails(torch_fn: Callable[..., None]) -> None:
    def via_float32(orig: Any, torch: Any, inp: Any, tgt: Any, *a: Any, **k: Any) -> Any:
        return orig(inp.float(), tgt.float(), *a, **k).double()

    torch_fn(via_float32)
    results = _run("torch", "float64")
    assert [r for r in results if not r.ok], "float64 computed through float32 went unnoticed"
    assert "exceeds tolerance" in _problems(results)


def test_batchmean_dividing_by_numel_fails_and_is_named(torch_fn: Callable[..., None]) -> None:
    def by_numel(orig: Any, torch: Any, inp: Any, tgt: Any, *a: Any, **k: Any) -> Any:
        if k.get("reduction") == "batchmean":
            k["reduction"] = "sum"
            return orig(inp, tgt, *a, **k) / inp.numel()
        return orig(inp, tgt, *a, **k)

    torch_fn(by_numel)
    results = _run("torch", "float32")
    failed = [r for r in results if not r.ok]
    # the end-to-end check and the check against torch's own elementwise output, both on batchmean
    assert failed and {r.reduction.split(" vs own ")[0] for r in failed} == {"batchmean"}
    assert "divided by C (classes) = 1000" in _problems(results)


def test_zero_probability_target_giving_nan_fails(torch_fn: Callable[..., None]) -> None:
    def nan_on_zero(orig: Any, torch: Any, inp: Any, tgt: Any, *a: Any, **k: Any) -> Any:
        reduction = k.pop("reduction", "mean")
        pointwise = orig(inp, tgt, *a, reduction="none", **k)
        zero = (tgt == float("-inf")) if k.get("log_target") else (tgt == 0)
        pointwise = torch.where(zero, torch.full_like(pointwise, float("nan")), pointwise)
        if reduction == "none":
            return pointwise
        total = pointwise.sum()
        return {"sum": total, "mean": total / pointwise.numel(), "batchmean": total / inp.size(0)}[reduction]

    torch_fn(nan_on_zero)
    results = _run("torch", "float32")
    failed = [r for r in results if not r.ok]
    assert failed and {r.case for r in failed} >= {"onehot_8x1000_T1", "teacher_masked0.25_8x100_T1"}
    assert "NaN where the reference is finite" in _problems(results)


def test_keras_epsilon_becoming_1e5_fails() -> None:
    if not REGISTRY["tensorflow"].available():
        pytest.skip(REGISTRY["tensorflow"].missing_reason())
    import keras

    before = keras.config.epsilon()
    keras.config.set_epsilon(1e-5)
    try:
        results = _run("tensorflow", "float32")
    finally:
        keras.config.set_epsilon(before)
    failed = [r for r in results if not r.ok]
    assert failed, "Keras clipping at 1e-5 instead of 1e-7 went unnoticed"
    assert "exceeds tolerance" in _problems(results)
