"""The MLX adapter and spec: exact conversions, the spec's formula on special values against MLX itself,
the sequential-sum budget, and that injected regressions (the mutants' patch point) reach the adapter.

The equivalence suite judges the adapter on every case; these tests pin what it relies on: every tested
dtype goes in and comes out exactly, ``kl_div_loss`` is ``torch_formula.torch_pointwise(log_target=True)`` summed
per row in every special case (masked classes, a -inf student, NaN, teacher mass underflowing against a
-inf student), and ``mlx.nn.losses.kl_div_loss`` is looked up at call time.
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from klparity.apis import SPECS
from klparity.apis.mlx_kl_div import MlxKlDiv, rows_of
from klparity.apis.pinning import kind
from klparity.apis.torch_kl_div import formula as torch_formula
from klparity.engine.forward import Cell, run_cell
from klparity.frameworks.mlx_adapter import ENTRY, MlxAdapter
from klparity.model import CheckResult
from klparity.numerics.cases import Case
from klparity.numerics.dtypes import dtype_info, round_to, widen
from klparity.numerics.errormodel import budget, profile, sequential_roundings
from klparity.numerics.exact import exact_of

mx = pytest.importorskip("mlx.core")
mlx_nn = pytest.importorskip("mlx.nn")

ADAPTER = MlxAdapter()
API = ADAPTER.apis("float32")[0]
NINF, NAN = -math.inf, math.nan


def _problems(results: list[CheckResult]) -> str:
    return "\n".join(p for r in results if not r.ok for p in r.problems)


def _same_special(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> None:
    """NaN, +inf, -inf and exact zeros in the same places (finite values are the suite's business)."""
    for name, pred in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf), ("0", lambda a: a == 0)):
        np.testing.assert_array_equal(pred(got), pred(want), err_msg=f"{name} pattern differs")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_conversion_round_trip_is_exact(dtype: str) -> None:
    """Every value of the dtype, specials and subnormals included, goes into MLX and back unchanged."""
    info = dtype_info(dtype)
    values = np.array([0.0, -0.0, 1.0, -1.5, 1 / 3, info.max, -info.max, info.smallest_normal,
                       info.smallest_subnormal, 3 * info.smallest_subnormal, math.inf, NINF, NAN])  # fmt: skip
    x = round_to(values, dtype)
    arr = ADAPTER.to_mlx(x)
    assert MlxAdapter.dtype_name(arr) == dtype
    back = ADAPTER.to_float64(arr)
    assert back.dtype == np.float64
    np.testing.assert_array_equal(back, widen(x))
    np.testing.assert_array_equal(np.signbit(back), np.signbit(widen(x)))


def test_float64_goes_in_as_float64_only_with_its_dtype() -> None:
    """The adapter passes dtype=: a float64 array stays float64 (mx.array alone would make it float32)."""
    x = np.array([1 / 3, 1e-300, 1e300])
    assert ADAPTER.to_mlx(x).dtype == mx.float64
    np.testing.assert_array_equal(ADAPTER.to_float64(ADAPTER.to_mlx(x)), x)
    assert mx.array(x).dtype == mx.float32


def test_bfloat16_from_ml_dtypes_is_exact() -> None:
    x = np.array([1.0, 3.140625, -65280.0, 2.0**-133], dtype=ml_dtypes.bfloat16)
    arr = ADAPTER.to_mlx(x)
    assert arr.dtype == mx.bfloat16
    np.testing.assert_array_equal(ADAPTER.to_float64(arr), x.astype(np.float64))


# Every (log p, log q) pair of special values, one pair per row, next to a neutral class.
LP_SPECIAL = (NINF, -700.0, -1.0, 0.0, NAN)
LQ_SPECIAL = (NINF, -700.0, -1.0, 0.0, NAN)


def _pairs() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    lp = np.array([[x, -0.5] for x in LP_SPECIAL for _ in LQ_SPECIAL])
    lq = np.array([[y, -0.5] for _ in LP_SPECIAL for y in LQ_SPECIAL])
    return lp, lq


def test_kl_div_loss_is_torch_log_target_pointwise_on_special_values() -> None:
    """MLX: sum(exp(t) * (t - x)); oracle: torch's log_target formula, with the teacher mass MLX's exp rounds
    to 0 made 0. Same NaN / inf / 0 rows: exp(-700) is 0 in float32 and, computed through float32, in float64
    too (0 * inf = NaN against a -inf student)."""
    lp, lq = _pairs()
    for dtype in ("float64", "float32"):
        got = ADAPTER.to_float64(mlx_nn.losses.kl_div_loss(ADAPTER.to_mlx(lq.astype(dtype)),
                                                          ADAPTER.to_mlx(lp.astype(dtype))))  # fmt: skip
        flushed = ADAPTER.to_float64(mx.exp(ADAPTER.to_mlx(lp.astype(dtype)))) == 0
        assert flushed[LP_SPECIAL.index(-700.0) * len(LQ_SPECIAL), 0], f"exp(-700) is no longer 0 in MLX {dtype}"
        with np.errstate(invalid="ignore"):
            want = np.sum(np.where(flushed, 0.0, np.exp(lp)) * (lp - lq), axis=-1)
        _same_special(got, want)
        # where nothing underflows, that is torch's log_target formula exactly
        kept = ~flushed.any(axis=-1)
        _same_special(want[kept], np.sum(torch_formula.torch_pointwise(lq, lp, log_target=True), axis=-1)[kept])
    # the masked-vocabulary NaN (teacher and student -inf on one class) is real, not an artefact of the model
    masked = mlx_nn.losses.kl_div_loss(mx.array([NINF, 0.0]), mx.array([NINF, 0.0]))
    assert math.isnan(float(ADAPTER.to_float64(masked)))


def _special_logits() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Rows: plain; masked on both sides; teacher masked; student masked; NaN teacher; teacher mass of
    exp(-200) (0 in float32) against a -inf student; teacher mass of 2e-9 (normal in float32 and bfloat16,
    below float16's smallest subnormal) against a -inf student."""
    teacher = np.array([[0.0, 1.0, -1.0], [0.0, NINF, 1.0], [0.0, NINF, 1.0], [0.0, 1.0, -1.0],
                        [0.0, NAN, 1.0], [0.0, -200.0, 0.5], [0.0, -19.0, 0.5]])  # fmt: skip
    student = np.array([[0.5, 0.0, -0.5], [0.5, NINF, 1.0], [0.5, 0.0, 1.0], [NINF, 0.0, 1.0],
                        [0.5, 0.0, 1.0], [0.0, NINF, 0.5], [0.0, NINF, 0.5]])  # fmt: skip
    return teacher, student


def test_spec_expectation_is_the_formula_on_special_values() -> None:
    """The spec's 'none' value equals MLX's formula evaluated directly in float64 on the exact log-probabilities
    (the surely-underflowing teacher mass made 0), and MLX's float32 output has the same special values."""
    teacher, student = _special_logits()
    ex = exact_of(teacher, student, 1.0)
    spec = MlxKlDiv()
    expected, _ = spec.expectations(API, ex, "float32", "float32", "mlx")
    lp = np.where(np.exp(ex.lp.astype(np.float32)) == 0, NINF, ex.lp)  # exp(-200) is 0 in float32
    with np.errstate(invalid="ignore"):
        direct = np.sum(np.exp(lp) * (lp - ex.lq), axis=-1)
    np.testing.assert_array_equal(np.isnan(expected["none"].value), np.isnan(direct))
    fin = np.isfinite(direct)
    np.testing.assert_array_equal(expected["none"].value[fin], direct[fin])
    _same_special(expected["none"].value, direct)
    # rows: plain finite, masked NaN, teacher-masked NaN, student-masked +inf, NaN, 0 * inf NaN, +inf
    assert [kind(v) for v in expected["none"].value] == ["finite", "nan", "nan", "+inf", "nan", "nan", "+inf"]
    out = ADAPTER.run(API, teacher.astype(np.float32), student.astype(np.float32), 1.0, "cpu", "contiguous")
    _same_special(out["none"].value, expected["none"].value)
    assert math.isnan(out["sum"].value) and math.isnan(out["mean"].value)
    assert spec.known_differences(API, ex, "float32") == ["mlx.masked_class_nan", "mlx.underflow_times_inf_nan"]
    # a teacher probability of 2e-9 underflows float16 (0 * inf = NaN there), not bfloat16 or float32 (+inf)
    assert [bool(np.isnan(rows_of(ex, d)[0][6])) for d in ("float16", "bfloat16", "float32")] == [True, False, False]
    out16 = ADAPTER.run(API, round_to(teacher, "float16"), round_to(student, "float16"), 1.0, "cpu", "contiguous")
    _same_special(out16["none"].value, rows_of(ex, "float16")[0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_special_cases_pass_and_report_result_dtype(dtype: str) -> None:
    """The cells of the special families pass in every dtype, and the result dtype is the input's."""
    assert "mlx_kl_div" in SPECS
    for case in (Case("masked", (2, 4, 100), 2.0, 0.25), Case("student_masked", (4, 10), 1.0),
                 Case("nan", (4, 10), 1.0), Case("teacher_masked", (8, 100), 1.0, 0.25),
                 Case("seed_article", (3,), 1.0, id="seed_article_T1")):  # fmt: skip
        results = run_cell(ADAPTER, Cell("mlx", API, case, dtype, "cpu", "contiguous"))
        assert results and all(r.ok for r in results), _problems(results)
    out = ADAPTER.run(API, round_to(np.zeros((2, 3)), dtype), round_to(np.ones((2, 3)), dtype), 1.0, "cpu",
                      "contiguous")  # fmt: skip
    assert {red: o.dtype for red, o in out.items()} == {"none": dtype, "sum": dtype, "mean": dtype}
    assert out["none"].value.shape == (2,) and out["sum"].value.shape == ()


def test_layouts_and_devices_other_than_contiguous_cpu_raise() -> None:
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="layout"):
        ADAPTER.run(API, x, x, 1.0, "cpu", "strided")
    with pytest.raises(ValueError, match="CPU only"):
        ADAPTER.run(API, x, x, 1.0, "gpu", "contiguous")
    assert ADAPTER.devices() == ("cpu",) and API.entry == ENTRY


def test_mean_overflow_of_the_float16_sum_is_expected() -> None:
    """mx.mean rounds the sum to float16 first: 4000 rows of KL 20 sum to 80000 > 65504, so the mean is inf
    although 20 fits."""
    teacher = np.tile(np.array([0.0, -20.0]), (4000, 1))
    student = np.tile(np.array([-20.0, 0.0]), (4000, 1))
    ex = exact_of(widen(round_to(teacher, "float16")), widen(round_to(student, "float16")), 1.0)
    spec = MlxKlDiv()
    expected, _ = spec.expectations(API, ex, "float16", "float16", "mlx")
    adjusted, hit = spec.adjust(expected)
    assert hit and adjusted["mean"].value == math.inf and math.isfinite(float(expected["mean"].value))
    out = ADAPTER.run(API, round_to(teacher, "float16"), round_to(student, "float16"), 1.0, "cpu", "contiguous")
    assert out["mean"].value == math.inf and out["sum"].value == math.inf


def test_sequential_sum_budget_counts_every_term() -> None:
    """Sequential sums (the adapter's ``ErrorProfile.sequential_sums``): C - 1 roundings per row, then R - 1
    over the rows, each relative to the partial sums
    (the summands, not the e_j); every other framework keeps log2 n times sum_j e_j, unchanged."""
    assert "float32" in profile("mlx").sequential_sums and "float32" not in profile("torch").sequential_sums
    ex = exact_of(*Case("gauss", (4, 1000), 1.0, 3.0).logits(), 1.0)
    kw: dict[str, Any] = dict(input_dtype="float32", compute_dtype="float32", p=ex.p, q=ex.q, zt=ex.zt, zs=ex.zs,
                              student_is_probability=False, log_p=ex.lp, log_q=ex.lq)  # fmt: skip
    seq, pair = budget(framework="mlx", **kw), budget(framework="torch", **kw)
    assert seq.sequential and not pair.sequential and seq.summands is not None
    np.testing.assert_array_equal(seq.elem_scale, pair.elem_scale)  # the same e_j; only the sums differ
    assert seq._sum_roundings(1000) == 999 and seq._sum_roundings(4000) == 999 + 3
    assert sequential_roundings(2) == 1.0 == math.log2(2)
    np.testing.assert_array_equal(pair.rows(), (pair.coeff_elem + math.log2(1000) * pair.u_sum)
                                  * pair.elem_scale.sum(axis=-1) + pair.floor.sum(axis=-1))  # fmt: skip
    np.testing.assert_array_equal(seq.rows(), seq.coeff_elem * seq.elem_scale.sum(axis=-1) + 999 * seq.u_sum
                                  * seq.summands.sum(axis=-1) + seq.floor.sum(axis=-1))  # fmt: skip
    assert seq.total() == (seq.coeff_elem * seq.elem_scale.sum() + (999 + 3) * seq.u_sum * seq.summands.sum()
                           + seq.floor.sum())  # fmt: skip
    # the summands bound the kernel's terms and both log-sum-exp shifts
    terms = np.abs(ex.p * (ex.lp - ex.lq))
    assert np.all(seq.summands >= terms + 2 * ex.p)


def test_suite_catches_a_patched_kl_div_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """The adapter looks kl_div_loss up at call time: a 1e-4 relative float32 drift patched into
    mlx.nn.losses fails cells (the patch point of the mutants)."""
    original = mlx_nn.losses.kl_div_loss
    monkeypatch.setattr(mlx_nn.losses, "kl_div_loss", lambda *a, **k: original(*a, **k) * (1 + 1e-4))
    results = run_cell(ADAPTER, Cell("mlx", API, Case("gauss", (4, 10), 1.0, 1.0), "float32", "cpu", "contiguous"))
    assert [r for r in results if not r.ok], "a 1e-4 relative drift in float32 went unnoticed"
    assert "exceeds tolerance" in _problems(results)
