"""The SciPy cross-oracle (``--klparity-oracle scipy``): same verdicts as the NumPy oracle, and its traps.

``exact.scipy_rows`` computes the exact per-row KL as ``sum(scipy.special.rel_entr(p, q), -1)`` on the
float64 softmax of the rounded logits, a second implementation independent of ``oracle.kl_from_logits``
(log space, phi-form sum). Each framework is run once per cell and judged against both oracles.
"""

from __future__ import annotations

import numpy as np
import pytest

from klparity.apis.keras_kl_divergence import formula as keras_formula
from klparity.engine import grid
from klparity.engine.forward import F64, Cell, run_cell
from klparity.frameworks import REGISTRY
from klparity.model import Exact, Output
from klparity.numerics import oracle
from klparity.numerics.cases import case_by_id, cases
from klparity.numerics.dtypes import round_to, widen
from klparity.numerics.errormodel import budget
from klparity.numerics.exact import ORACLES, exact_of, scipy_rows

scipy_special = pytest.importorskip("scipy.special")
scipy_stats = pytest.importorskip("scipy.stats")

#: Where the two oracles must disagree: logits spread over 1e4, so most float64 probabilities underflow
#: to 0 while their logs are finite. The student's underflowed classes where the teacher has mass make
#: sum(rel_entr) +inf; the exact KL (the log-space oracle) is finite.
UNDERFLOW_CASE = "spread10000_4x100_T1"


def _sample(framework: str, dtype: str) -> list[Cell]:
    sel = grid.Selection(frameworks=(framework,), dtypes=(dtype,), devices=("cpu",))
    return [c for c in grid.cells(sel) if c.layout == "contiguous" and grid.skip_reason(c, 0) is None]


def _both_ways(cell: Cell) -> tuple[list[bool], list[bool], list[str]]:
    """Run the framework once; judge its outputs against each oracle. (numpy oks, scipy oks, scipy problems)."""
    adapter = REGISTRY[cell.framework]
    t, s = cell.case.logits(0)
    outputs = adapter.call(cell.api, round_to(t, cell.dtype), round_to(s, cell.dtype), cell.case.temperature,
                          cell.device, cell.layout)  # fmt: skip

    def replay(*_: object) -> dict[str, Output]:
        return outputs

    by_numpy = run_cell(adapter, cell, call=replay, oracle_name="numpy")
    by_scipy = run_cell(adapter, cell, call=replay, oracle_name="scipy")
    assert [r.reduction for r in by_numpy] == [r.reduction for r in by_scipy]
    return [r.ok for r in by_numpy], [r.ok for r in by_scipy], [p for r in by_scipy for p in r.problems]


@pytest.mark.parametrize(("framework", "dtype"), [("torch", "float64"), ("torch", "float16"), ("jax", "float32"),
                                                  ("tensorflow", "float32")])  # fmt: skip
def test_verdicts_agree_with_the_numpy_oracle(framework: str, dtype: str) -> None:
    if not REGISTRY[framework].available():
        pytest.skip(REGISTRY[framework].missing_reason())
    cells = _sample(framework, dtype)
    assert len({c.case.id for c in cells}) >= 25
    compared = 0
    for cell in cells:
        numpy_ok, scipy_ok, problems = _both_ways(cell)
        if cell.case.id == UNDERFLOW_CASE:
            continue  # pinned by the next test
        assert all(numpy_ok), f"{cell.id} fails against the NumPy oracle"
        assert scipy_ok == numpy_ok, f"{cell.id}: the SciPy oracle disagrees: {problems}"
        compared += 1
    assert compared == len(cells) - sum(c.case.id == UNDERFLOW_CASE for c in cells)


def test_scipy_oracle_is_wrong_where_float64_probabilities_underflow() -> None:
    """The one disagreement the quick tier shows: the probability-space oracle, not a framework, is wrong."""
    if not REGISTRY["torch"].available():
        pytest.skip(REGISTRY["torch"].missing_reason())
    cell = next(c for c in _sample("torch", "float64") if c.case.id == UNDERFLOW_CASE and c.api.option("log_target"))
    numpy_ok, scipy_ok, problems = _both_ways(cell)
    assert all(numpy_ok)
    assert not all(scipy_ok)
    assert any("no documented difference to explain it" in p for p in problems)
    t, s = (widen(round_to(x, "float64")) for x in cell.case.logits(0))
    exact = oracle.kl_from_logits(t, s, cell.case.temperature)
    assert np.all(np.isfinite(exact)) and np.all(np.isposinf(scipy_rows(t, s, cell.case.temperature)))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_exact_rows_agree_within_the_float64_error_model(dtype: str) -> None:
    """Every quick case but the underflow one: same NaN/inf rows, finite rows within the float64 budget."""
    worst = 0.0
    for case in (c for c in cases("quick") if c.id != UNDERFLOW_CASE):
        t, s = (widen(round_to(x, dtype)) for x in case.logits(0))
        ex = exact_of(t, s, case.temperature)
        by_scipy = exact_of(t, s, case.temperature, "scipy").rows
        np.testing.assert_array_equal(np.isnan(by_scipy), np.isnan(ex.rows), err_msg=case.id)
        np.testing.assert_array_equal(np.isinf(by_scipy), np.isinf(ex.rows), err_msg=case.id)
        bound = _f64_bound(ex)
        fin = np.isfinite(ex.rows)
        err = np.abs(by_scipy[fin] - ex.rows[fin])
        assert np.all(err <= np.broadcast_to(bound, ex.rows.shape)[fin]), case.id
        worst = max(worst, float(np.max(err / np.broadcast_to(bound, ex.rows.shape)[fin], initial=0.0)))
    assert worst > 0.0  # the two implementations do differ in rounding: this compared something


def test_unknown_oracle_is_refused() -> None:
    assert ORACLES == ("numpy", "scipy")
    with pytest.raises(ValueError, match="unknown oracle 'mpmath'"):
        exact_of(np.zeros(3), np.zeros(3), 1.0, "mpmath")


# ------------------------------------------------------------------------------------------ traps
# Two SciPy functions that look like the per-row KL and are not; the cross-oracle uses neither.


def _case(case_id: str) -> tuple[Exact, F64]:
    """The float64 quantities of a suite case, and the float64 error-model bound on its row sums."""
    case = case_by_id(case_id)
    ex = exact_of(*case.logits(0), case.temperature)
    return ex, _f64_bound(ex)


def _f64_bound(ex: Exact) -> F64:
    """Per-row bound on the difference of two float64 evaluations of the KL sum (the float64 tolerance)."""
    return budget(framework="*", input_dtype="float64", compute_dtype="float64", p=ex.p, q=ex.q, zt=ex.zt,
                  zs=ex.zs, student_is_probability=True, log_p=ex.lp, log_q=ex.lq).rows()  # fmt: skip


def test_trap_scipy_stats_entropy_reduces_axis_zero_and_renormalises() -> None:
    ex, bound = _case("gauss3_8x1000_T0.5")
    # axis 0 by default: one value per class column of the (8, 1000) batch, not one per row
    assert scipy_stats.entropy(ex.p, ex.q).shape == (1000,)
    assert np.all(np.abs(scipy_stats.entropy(ex.p, ex.q, axis=-1) - ex.rows) <= bound)
    # it renormalises: on Keras's clipped (unnormalised) probabilities it is not Keras's formula
    eps = keras_formula.KERAS_EPSILON
    keras_rows = keras_formula.keras_kl_divergence(ex.p, ex.q, reduction="none")
    renormalised = scipy_stats.entropy(np.clip(ex.p, eps, 1.0), np.clip(ex.q, eps, 1.0), axis=-1)
    assert np.all(np.abs(renormalised - keras_rows) > bound)


def test_trap_scipy_special_kl_div_adds_q_minus_p() -> None:
    ex, bound = _case("gauss3_8x1000_T0.5")
    pt, qt = np.clip(ex.p, keras_formula.KERAS_EPSILON, 1.0), np.clip(ex.q, keras_formula.KERAS_EPSILON, 1.0)
    keras_rows = keras_formula.keras_kl_divergence(ex.p, ex.q, reduction="none")
    # sum(rel_entr) is Keras's clipped formula ...
    assert np.all(np.abs(np.sum(scipy_special.rel_entr(pt, qt), axis=-1) - keras_rows) <= bound)
    # ... sum(kl_div) = sum(rel_entr - p + q) is off by sum(q) - sum(p), which clipping makes nonzero
    kl_div_rows = np.sum(scipy_special.kl_div(pt, qt), axis=-1)
    offset = np.sum(qt, axis=-1) - np.sum(pt, axis=-1)
    assert np.all(np.abs(kl_div_rows - keras_rows) > bound)
    assert np.all(np.abs(kl_div_rows - offset - keras_rows) <= bound)
    # on the normalised softmax the offset is rounding only: there kl_div hides the trap
    assert np.all(np.abs(np.sum(scipy_special.kl_div(ex.p, ex.q), axis=-1) - ex.rows) <= bound)
