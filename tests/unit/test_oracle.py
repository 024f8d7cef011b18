"""Self-tests of the float64 oracle (``klparity.numerics.oracle``).

The oracle is what every framework result is judged against, so it is checked here against
references that share none of its code: an mpmath evaluation at 50 significant digits, SciPy's
``rel_entr`` / ``kl_div`` / ``entropy``, and small examples worked out by hand with ``math.log``.
Random inputs come from ``np.random.default_rng(zlib.crc32(<test id>))`` only, and hypothesis runs
derandomised without a database, so every run sees the same cases.

Some tests pin oracle defects found while writing this file (all fixed): rounding error growing with
the size rather than the spread of logits / T, NaN instead of +inf where an underflowed teacher mass
meets a student -inf, an unknown Keras reduction accepted on 1-D input, escaping RuntimeWarnings.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import mpmath as mp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from klparity.apis.keras_kl_divergence import formula as keras_formula
from klparity.apis.torch_kl_div import formula as torch_formula
from klparity.numerics import oracle

REL_TOL = 1e-13  # kl_from_logits vs mpmath: each row within REL_TOL relative ...
ABS_TOL = 1e-15  # ... or ABS_TOL absolute
MP_DPS = 50

NINF = -math.inf
HYPOTHESIS = settings(deadline=None, database=None, derandomize=True, max_examples=150)


def _rng(test_id: str) -> np.random.Generator:
    """The only source of randomness in this file: a generator seeded by crc32 of a stable id."""
    return np.random.default_rng(zlib.crc32(test_id.encode("utf-8")))


# ------------------------------------------------------------------------- mpmath reference


def _mp_log_softmax(row: Sequence[float], temperature: mp.mpf) -> list[mp.mpf] | None:
    """log softmax(row / T) in mpmath from the float64 values exactly as given; None if undefined.

    ``log p_j = (z_j - m) - log1p(sum_{i != argmax} exp(z_i - m))``: the log1p keeps a tiny
    normaliser from being absorbed into the row max, so near one-hot rows stay exact at 50 digits.
    """
    z = [mp.mpf(float(v)) / temperature for v in row]
    finite = [i for i, v in enumerate(z) if mp.isfinite(v)]
    if not finite or any(v == mp.inf for v in z):
        return None  # all -inf (or a +inf logit): no distribution
    k = max(finite, key=lambda i: z[i])
    m = z[k]
    log_norm = mp.log1p(mp.fsum(mp.exp(z[i] - m) for i in finite if i != k))
    return [(v - m) - log_norm if mp.isfinite(v) else mp.ninf for v in z]


def mp_kl_row(teacher: Sequence[float], student: Sequence[float], temperature: float) -> mp.mpf:
    """KL(softmax(t/T) || softmax(s/T)) of one row at 50 digits, as sum_j p_j (log p_j - log q_j).

    Classes with p_j = 0 (teacher -inf) contribute 0; p_j > 0 with q_j = 0 gives +inf; NaN anywhere
    in the row, or a row with no distribution, gives NaN.
    """
    with mp.workdps(MP_DPS):
        if any(math.isnan(float(v)) for v in (*teacher, *student)):
            return mp.nan
        temp = mp.mpf(float(temperature))
        lp = _mp_log_softmax(teacher, temp)
        lq = _mp_log_softmax(student, temp)
        if lp is None or lq is None:
            return mp.nan
        terms = []
        for a, b in zip(lp, lq, strict=True):
            if a == mp.ninf:
                continue
            if b == mp.ninf:
                return mp.inf
            terms.append(mp.exp(a) * (a - b))
        return mp.fsum(terms)


def mp_kl(teacher: np.ndarray, student: np.ndarray, temperature: float) -> list[mp.mpf]:
    """``mp_kl_row`` over the rows of (..., C) arrays, flattened in C order."""
    c = teacher.shape[-1]
    return [
        mp_kl_row(t, s, temperature)
        for t, s in zip(teacher.reshape(-1, c).tolist(), student.reshape(-1, c).tolist(), strict=True)
    ]


def row_error(value: float, ref: mp.mpf) -> tuple[bool, float, float]:
    """(within REL_TOL relative or ABS_TOL absolute, relative error, absolute error) of one row."""
    if mp.isnan(ref):
        return math.isnan(value), 0.0, 0.0
    if mp.isinf(ref):
        return value == float(ref), 0.0, 0.0
    if not math.isfinite(value):
        return False, math.inf, math.inf
    with mp.workdps(MP_DPS):
        abs_err = abs(mp.mpf(value) - ref)
        rel_err = abs_err / abs(ref) if ref != 0 else (mp.inf if abs_err else mp.mpf(0))
    return bool(rel_err <= REL_TOL or abs_err <= ABS_TOL), float(rel_err), float(abs_err)


def assert_matches_mp(
    result: np.ndarray, teacher: np.ndarray, student: np.ndarray, temperature: float
) -> None:
    refs = mp_kl(teacher, student, temperature)
    values = np.asarray(result, dtype=np.float64).reshape(-1).tolist()
    assert len(values) == len(refs)
    for i, (v, ref) in enumerate(zip(values, refs, strict=True)):
        ok, rel, ab = row_error(v, ref)
        assert ok, f"row {i}: oracle {v!r}, mpmath {mp.nstr(ref, 20)} (rel {rel:.3g}, abs {ab:.3g})"


# ------------------------------------------------------------------------- random cases vs mpmath

KINDS = ("independent", "near_identical", "peaked", "masked")
CASES_PER_KIND = 60  # 240 random cases in all


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(math.log(lo), math.log(hi))))


def random_case(rng: np.random.Generator, kind: str) -> dict[str, Any]:
    """One random case: 1-3 rows, C in [2, 2000], logit scale in [0.01, 30], T in [0.05, 1000]."""
    rows = int(rng.integers(1, 4))
    c = round(_log_uniform(rng, 2, 2000))
    scale = _log_uniform(rng, 0.01, 30.0)
    temperature = _log_uniform(rng, 0.05, 1000.0)
    shape = (rows, c)
    teacher = rng.normal(0.0, scale, shape)
    extra: dict[str, float] = {}
    if kind == "independent":
        student = rng.normal(0.0, scale, shape)
    elif kind == "near_identical":  # tiny KL: the student is the teacher nudged by eps * scale
        eps = 10.0 ** rng.uniform(-14, -2)
        student = teacher + eps * scale * rng.normal(0.0, 1.0, shape)
        extra["eps"] = eps
    elif kind == "peaked":  # teacher near one-hot, most probabilities far below 1e-300 at low T
        boost = _log_uniform(rng, 1.0, 40.0)
        hot = rng.integers(0, c, rows)
        teacher[np.arange(rows), hot] += boost
        student = rng.normal(0.0, scale, shape)
        extra["boost"] = boost
    elif kind == "masked":  # -inf on the teacher only, or on both, never on class 0
        student = rng.normal(0.0, scale, shape)
        both = rng.random(shape) < 0.2
        teacher_only = (rng.random(shape) < 0.2) & ~both
        both[:, 0] = teacher_only[:, 0] = False
        teacher[both | teacher_only] = NINF
        student[both] = NINF
    else:
        raise AssertionError(kind)
    return {"teacher": teacher, "student": student, "temperature": temperature, "scale": scale, **extra}


@pytest.mark.parametrize("kind", KINDS)
def test_kl_from_logits_matches_mpmath_on_random_cases(kind: str) -> None:
    """240 random cases in all; every row within 1e-13 relative or 1e-15 absolute of mpmath."""
    rng = _rng(f"test_oracle.kl_from_logits_vs_mpmath.{kind}")
    failures = []
    for n in range(CASES_PER_KIND):
        case = random_case(rng, kind)
        result = oracle.kl_from_logits(case["teacher"], case["student"], case["temperature"])
        assert result.shape == case["teacher"].shape[:-1]
        refs = mp_kl(case["teacher"], case["student"], case["temperature"])
        for row, (value, ref) in enumerate(zip(result.tolist(), refs, strict=True)):
            ok, rel, ab = row_error(value, ref)
            if not ok:
                params = {k: v for k, v in case.items() if k not in ("teacher", "student")}
                failures.append(
                    f"case {n} row {row} C={case['teacher'].shape[-1]} {params}: oracle {value!r} "
                    f"mpmath {mp.nstr(ref, 20)} rel {rel:.3g} abs {ab:.3g}"
                )
    assert not failures, f"{len(failures)} rows out of tolerance:\n" + "\n".join(failures[:5])


def test_seed_article_example_matches_mpmath() -> None:
    teacher, student = np.array([5.0, 4.0, 0.1]), np.array([4.0, 3.9, 1.0])
    for temperature in (1.0, 5.0):
        assert_matches_mp(oracle.kl_from_logits(teacher, student, temperature), teacher, student, temperature)


@pytest.mark.parametrize(
    ("teacher", "student", "temperature"),
    [
        ([1000.3, 1000.0], [1000.0, 1000.1], 0.7),  # offset logits: rel. error 3.4e-13
        ([25.7, 25.74], [25.72, 25.74], 0.078),  # LLM-sized logits, low T: rel. error 2.4e-13
    ],
)
def test_kl_from_logits_accuracy_does_not_depend_on_logit_magnitude(
    teacher: list[float], student: list[float], temperature: float
) -> None:
    t, s = np.array(teacher), np.array(student)
    assert_matches_mp(oracle.kl_from_logits(t, s, temperature), t, s, temperature)


@pytest.mark.parametrize("temperature", [0.25, 2.0, 8.0, 1 / 3])
def test_power_of_two_temperature_path_matches_mpmath(temperature: float) -> None:
    """1/T is exact for a power of two, so the oracle multiplies there and divides elsewhere."""
    rng = _rng(f"test_oracle.power_of_two.{temperature}")
    teacher, student = rng.normal(0, 3, (4, 300)), rng.normal(0, 3, (4, 300))
    assert_matches_mp(oracle.kl_from_logits(teacher, student, temperature), teacher, student, temperature)


def _mixed_rows(test_id: str, rows: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 logits whose rows take the fast form and the phi-form: small KL, -inf, NaN rows."""
    rng = _rng(test_id)
    t = rng.normal(0, 3, (rows, classes)).astype(np.float32)
    s = rng.normal(0, 3, (rows, classes)).astype(np.float32)
    s[1::7] = t[1::7] + np.float32(1e-4) * rng.standard_normal(classes).astype(np.float32)  # KL ~ 1e-9
    t[2::7, :3] = -np.inf
    s[3::7, 5] = -np.inf
    t[4::7, 9] = np.nan
    return t, s


def test_blocked_threaded_oracle_equals_the_single_block_phi_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks, threads and the fast form change nothing beyond 1e-13 relative; threads change no bit."""
    t, s = _mixed_rows("test_oracle.blocked_threaded", 70, 8000)  # 560,000 elements: threaded
    assert t.size >= oracle._THREAD_MIN_ELEMENTS
    results = {}
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        results[threads] = oracle.kl_from_logits(t, s, 0.7)
    np.testing.assert_array_equal(results["1"], results["2"])
    np.testing.assert_array_equal(results["1"], results["3"])
    phi = oracle._kl_normalised_log(oracle.log_softmax(t, 0.7), oracle.log_softmax(s, 0.7))
    np.testing.assert_array_equal(np.isnan(results["1"]), np.isnan(phi))
    np.testing.assert_array_equal(np.isinf(results["1"]), np.isinf(phi))
    finite = np.isfinite(phi)
    assert finite.sum() >= 50 and np.isnan(phi).sum() >= 10 and np.isinf(phi).sum() >= 10
    np.testing.assert_allclose(results["1"][finite], phi[finite], rtol=REL_TOL, atol=0)


def test_fast_form_is_used_on_ordinary_rows_and_refused_on_cancelling_ones() -> None:
    """The fast form is not a dead branch: it serves rows with an O(1) KL, not rows with KL ~ 1e-9."""
    t, s = _mixed_rows("test_oracle.fast_form_rows", 14, 500)
    calls: list[int] = []
    original = oracle._kl_normalised_log

    def counting(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
        calls.append(lp.shape[0])
        return original(lp, lq)

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(oracle, "_kl_normalised_log", counting)
        oracle.kl_from_logits(t, s, 1.0)
    # rows 1, 8 (small KL), 2, 9 (teacher -inf), 3, 10 (student -inf), 4, 11 (NaN) leave the fast form
    assert sum(calls) == 8


# ------------------------------------------------------------------------- exact edge cases


def test_identical_inputs_give_exactly_zero() -> None:
    rng = _rng("test_oracle.identical")
    x = rng.normal(0.0, 5.0, (4, 300))
    x[1, ::7] = NINF  # masked classes on both sides
    for temperature in (0.05, 1.0, 1000.0):
        result = oracle.kl_from_logits(x, x.copy(), temperature)
        assert result.tolist() == [0.0] * 4
    p = oracle.softmax(x)
    assert oracle.kl_from_probs(p, p.copy()).tolist() == [0.0] * 4


def test_identical_log_probs_give_exactly_zero() -> None:
    lp = oracle.log_softmax(_rng("test_oracle.identical_log").normal(0.0, 5.0, (3, 50)))
    lp[0, 3] = NINF
    assert oracle.kl_from_log_probs(lp, lp.copy()).tolist() == [0.0] * 3


def test_teacher_neg_inf_classes_contribute_zero() -> None:
    """p_j = 0 adds nothing, but q_j still takes part in normalising q: KL = KL_kept - log Q_kept."""
    rng = _rng("test_oracle.teacher_masked")
    teacher, student = rng.normal(0.0, 2.0, (3, 40)), rng.normal(0.0, 2.0, (3, 40))
    masked = rng.random((3, 40)) < 0.3
    masked[:, 0] = False
    teacher[masked] = NINF
    temperature = 1.7
    result = oracle.kl_from_logits(teacher, student, temperature)
    assert_matches_mp(result, teacher, student, temperature)
    with mp.workdps(MP_DPS):
        for row in range(3):
            keep = ~masked[row]
            reduced = mp_kl_row(teacher[row, keep], student[row, keep], temperature)
            lq = _mp_log_softmax(student[row].tolist(), mp.mpf(temperature))
            assert lq is not None
            log_q_kept = mp.log(mp.fsum(mp.exp(v) for v, k in zip(lq, keep, strict=True) if k))
            ok, rel, _ = row_error(float(result[row]), reduced - log_q_kept)
            assert ok, (row, rel)
            assert log_q_kept < -1e-3  # the removed student mass is not negligible: a real check


def test_neg_inf_on_both_sides_is_the_same_as_removing_the_class() -> None:
    rng = _rng("test_oracle.both_masked")
    teacher, student = rng.normal(0.0, 3.0, (5, 30)), rng.normal(0.0, 3.0, (5, 30))
    for row in range(5):
        masked = rng.random(30) < 0.4
        masked[row] = False
        t, s = teacher[row].copy(), student[row].copy()
        t[masked] = s[masked] = NINF
        full = float(oracle.kl_from_logits(t, s, 2.0))
        removed = float(oracle.kl_from_logits(teacher[row, ~masked], student[row, ~masked], 2.0))
        assert full == pytest.approx(removed, rel=1e-14, abs=0.0)
        assert_matches_mp(np.asarray(full), t, s, 2.0)


def test_student_neg_inf_where_teacher_has_mass_gives_inf() -> None:
    teacher = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    student = np.array([[0.0, NINF, 1.0], [0.0, 1.0, 1.0]])
    result = oracle.kl_from_logits(teacher, student)
    assert result[0] == math.inf
    assert math.isfinite(result[1]) and result[1] > 0


@pytest.mark.parametrize("api", ["kl_from_logits", "kl_from_log_probs"])
def test_underflowed_teacher_mass_against_student_neg_inf_gives_inf(api: str) -> None:
    teacher, student = np.array([0.0, -800.0]), np.array([0.0, NINF])
    # p_1 = e^-800 / (1 + e^-800) > 0 and q_1 = 0: the exact KL is +inf (mpmath agrees)
    assert mp_kl_row(teacher.tolist(), student.tolist(), 1.0) == mp.inf
    assert float(getattr(oracle, api)(teacher, student)) == math.inf


def test_nan_poisons_only_its_row() -> None:
    rng = _rng("test_oracle.nan")
    teacher, student = rng.normal(0.0, 1.0, (4, 6)), rng.normal(0.0, 1.0, (4, 6))
    teacher[0, 2] = np.nan
    student[2, 5] = np.nan
    result = oracle.kl_from_logits(teacher, student)
    assert np.isnan(result).tolist() == [True, False, True, False]
    assert np.all(np.isfinite(result[[1, 3]]))
    p, q = oracle.softmax(teacher), oracle.softmax(student)
    assert np.isnan(oracle.kl_from_probs(p, q)).tolist() == [True, False, True, False]
    with np.errstate(divide="ignore"):
        lp, lq = np.log(p), np.log(q)
    assert np.isnan(oracle.kl_from_log_probs(lp, lq)).tolist() == [True, False, True, False]


def test_nan_in_a_teacher_masked_row_still_gives_nan() -> None:
    teacher = np.array([NINF, 1.0, 2.0])
    student = np.array([np.nan, 1.0, 2.0])  # NaN exactly where the teacher is -inf
    assert math.isnan(float(oracle.kl_from_logits(teacher, student)))
    assert math.isnan(float(oracle.kl_from_probs([0.0, 0.5, 0.5], [np.nan, 0.5, 0.5])))
    assert math.isnan(float(oracle.kl_from_log_probs([NINF, -0.7, -0.7], [np.nan, -0.7, -0.7])))


def test_all_neg_inf_row_gives_nan() -> None:
    finite = np.array([0.5, 1.0, -2.0])
    masked = np.full(3, NINF)
    assert math.isnan(float(oracle.kl_from_logits(masked, finite)))
    assert math.isnan(float(oracle.kl_from_logits(finite, masked)))
    assert math.isnan(float(oracle.kl_from_logits(masked, masked)))
    result = oracle.kl_from_logits(np.stack([finite, masked]), np.stack([finite[::-1], finite]))
    assert math.isfinite(result[0]) and math.isnan(result[1])


def test_one_dimensional_input_gives_a_zero_dim_array() -> None:
    t, s = np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])
    for result in (
        oracle.kl_from_logits(t, s),
        oracle.kl_from_log_probs(oracle.log_softmax(t), oracle.log_softmax(s)),
        oracle.kl_from_probs(oracle.softmax(t), oracle.softmax(s)),
    ):
        assert isinstance(result, np.ndarray)
        assert result.shape == ()
        assert result.dtype == np.float64
        assert float(result) > 0


def test_three_dimensional_input_gives_batch_by_sequence() -> None:
    rng = _rng("test_oracle.3d")
    teacher, student = rng.normal(0.0, 2.0, (2, 5, 7)), rng.normal(0.0, 2.0, (2, 5, 7))
    result = oracle.kl_from_logits(teacher, student, 1.5)
    assert result.shape == (2, 5)
    rows = oracle.kl_from_logits(teacher.reshape(10, 7), student.reshape(10, 7), 1.5)
    np.testing.assert_array_equal(result.reshape(10), rows)
    assert_matches_mp(result, teacher, student, 1.5)


def test_narrow_float_inputs_are_widened_exactly() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = _rng("test_oracle.narrow")
    t64, s64 = rng.normal(0.0, 3.0, (3, 20)), rng.normal(0.0, 3.0, (3, 20))
    for dtype in (np.float16, np.float32, ml_dtypes.bfloat16):
        t, s = t64.astype(dtype), s64.astype(dtype)
        result = oracle.kl_from_logits(t, s, 2.0)
        np.testing.assert_array_equal(
            result, oracle.kl_from_logits(t.astype(np.float64), s.astype(np.float64), 2.0)
        )
        assert not np.array_equal(result, oracle.kl_from_logits(t64, s64, 2.0))  # rounding is seen


# ------------------------------------------------------------------------- scipy


def _random_distributions(test_id: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, float]:
    rng = _rng(test_id)
    temperature = _log_uniform(rng, 0.5, 5.0)
    teacher, student = rng.normal(0.0, 3.0, shape), rng.normal(0.0, 3.0, shape)
    return teacher, student, temperature


@pytest.mark.parametrize("c", [2, 10, 1000])
def test_kl_from_logits_matches_scipy_rel_entr(c: int) -> None:
    for trial in range(5):
        teacher, student, temperature = _random_distributions(f"test_oracle.rel_entr.{c}.{trial}", (6, c))
        p, q = oracle.softmax(teacher, temperature), oracle.softmax(student, temperature)
        expected = np.sum(scipy.special.rel_entr(p, q), axis=-1)
        np.testing.assert_allclose(
            oracle.kl_from_logits(teacher, student, temperature), expected, rtol=1e-12, atol=0
        )


SPECIAL = (0.0, 1e-300, 0.2, 0.5, 1.0, 3.0, math.inf, math.nan)


def test_kl_from_probs_matches_rel_entr_on_special_values() -> None:
    """Every (x, y) pair of special values, one pair per row next to a neutral (0.5, 0.5) class."""
    pairs = [(x, y) for x in SPECIAL for y in SPECIAL]
    p = np.array([[x, 0.5] for x, _ in pairs])
    q = np.array([[y, 0.5] for _, y in pairs])
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        expected = scipy.special.rel_entr(p, q).sum(axis=-1)
    result = oracle.kl_from_probs(p, q)
    for (x, y), got, want in zip(pairs, result.tolist(), expected.tolist(), strict=True):
        if math.isnan(want) or math.isinf(want):
            assert got == want or (math.isnan(got) and math.isnan(want)), (x, y, got, want)
        else:
            assert got == pytest.approx(want, rel=1e-14, abs=1e-300), (x, y, got, want)
    # the semantics spelled out: 0 log 0 = 0, p > 0 against q = 0 is +inf, NaN stays NaN
    assert float(oracle.kl_from_probs([0.0, 1.0], [0.0, 1.0])) == 0.0
    assert float(oracle.kl_from_probs([0.0, 1.0], [0.5, 0.5])) == pytest.approx(math.log(2.0), rel=1e-15)
    assert float(oracle.kl_from_probs([0.5, 0.5], [0.0, 1.0])) == math.inf


def test_kl_from_probs_matches_rel_entr_on_random_unnormalised_input() -> None:
    rng = _rng("test_oracle.kl_from_probs_random")
    p, q = rng.random((8, 50)), rng.random((8, 50)) * 3
    p[p < 0.1] = 0.0
    np.testing.assert_allclose(oracle.kl_from_probs(p, q), scipy.special.rel_entr(p, q).sum(-1), rtol=1e-12)


def test_kl_from_log_probs_matches_kl_from_probs_on_exp() -> None:
    rng = _rng("test_oracle.log_probs")
    lp = oracle.log_softmax(rng.normal(0.0, 3.0, (6, 40)))
    lq = rng.normal(-4.0, 2.0, (6, 40))  # not normalised: neither function renormalises
    lp[0, :5] = NINF  # p = 0: contributes 0
    lp[1, 3] = lq[1, 3] = NINF  # both -inf: contributes 0
    lq[2, 7] = NINF  # student -inf where the teacher has mass: +inf
    result = oracle.kl_from_log_probs(lp, lq)
    with np.errstate(under="ignore"):
        expected = oracle.kl_from_probs(np.exp(lp), np.exp(lq))
    assert result[2] == expected[2] == math.inf
    np.testing.assert_allclose(result, expected, rtol=1e-12, atol=1e-15)
    assert np.all(np.isfinite(result[[0, 1, 3, 4, 5]]))


def test_scipy_entropy_trap_axis_zero() -> None:
    """scipy.stats.entropy(p, q) reduces over axis 0: on (B, C) input it is not the per-row KL."""
    teacher, student, temperature = _random_distributions("test_oracle.entropy_axis", (4, 6))
    p, q = oracle.softmax(teacher, temperature), oracle.softmax(student, temperature)
    per_row = oracle.kl_from_logits(teacher, student, temperature)
    default = scipy.stats.entropy(p, q)
    assert default.shape == (6,)  # one value per class column, not per row
    assert not np.allclose(default[:4], per_row, rtol=1e-3)
    np.testing.assert_allclose(scipy.stats.entropy(p, q, axis=-1), per_row, rtol=1e-12)


def test_scipy_entropy_trap_renormalises() -> None:
    """entropy() renormalises its inputs; the oracle's kl_from_probs (rel_entr semantics) does not."""
    p, q = np.array([0.2, 0.3, 0.5]), np.array([0.5, 0.25, 0.25])
    kl = float(oracle.kl_from_probs(p, q))
    assert scipy.stats.entropy(2 * p, 3 * q) == pytest.approx(kl, rel=1e-14)
    # sum 2p log(2p / 3q) = 2 KL + 2 log(2/3)
    unnormalised = float(oracle.kl_from_probs(2 * p, 3 * q))
    assert unnormalised == pytest.approx(2 * kl + 2 * math.log(2 / 3), rel=1e-14)
    assert abs(unnormalised - kl) > 0.1


def test_scipy_kl_div_is_rel_entr_minus_p_plus_q() -> None:
    rng = _rng("test_oracle.kl_div")
    x, y = rng.random((5, 30)), rng.random((5, 30))
    x[0, :3] = 0.0
    np.testing.assert_allclose(
        scipy.special.kl_div(x, y), scipy.special.rel_entr(x, y) - x + y, rtol=1e-13, atol=1e-16
    )
    # normalised input: the -p + q terms cancel and the row sum is the KL ...
    p, q = x / x.sum(-1, keepdims=True), y / y.sum(-1, keepdims=True)
    np.testing.assert_allclose(
        scipy.special.kl_div(p, q).sum(-1), oracle.kl_from_probs(p, q), rtol=1e-12, atol=1e-15
    )
    # ... unnormalised input: the row sum is off by sum(q) - sum(p)
    kl_div_rows = scipy.special.kl_div(x, y).sum(-1)
    expected_offset = y.sum(-1) - x.sum(-1)
    assert np.all(np.abs(expected_offset) > 0.1)
    np.testing.assert_allclose(kl_div_rows - oracle.kl_from_probs(x, y), expected_offset, rtol=1e-12)


# ------------------------------------------------------------------------- torch formula

LOG = math.log


def test_torch_pointwise_hand_worked() -> None:
    q = [0.1, 0.6, 0.3]
    target = np.array([0.2, 0.3, 0.5])
    result = torch_formula.torch_pointwise(np.log(q), target)
    expected = [p * (LOG(p) - LOG(qq)) for p, qq in zip(target.tolist(), q, strict=True)]
    np.testing.assert_allclose(result, expected, rtol=1e-14, atol=0)


def test_torch_pointwise_zero_target_and_neg_inf_input() -> None:
    inputs = np.array([NINF, -1.0, NINF, LOG(0.5)])
    target = np.array([0.0, 0.0, 0.3, 0.7])
    result = torch_formula.torch_pointwise(inputs, target)
    assert math.isnan(result[0])  # 0 * -inf = NaN, as torch computes it
    assert result[1] == 0.0  # xlogy(0, 0) - 0 * x = 0
    assert result[2] == math.inf
    assert result[3] == pytest.approx(0.7 * (LOG(0.7) - LOG(0.5)), rel=1e-14)


def test_torch_pointwise_log_target() -> None:
    inputs = np.array([LOG(0.25), NINF, -2.0, NINF])
    target = np.array([LOG(0.5), NINF, NINF, -1.0])
    result = torch_formula.torch_pointwise(inputs, target, log_target=True)
    assert result[0] == pytest.approx(0.5 * (LOG(0.5) - LOG(0.25)), rel=1e-14)
    assert math.isnan(result[1])  # exp(-inf) * (-inf - -inf) = 0 * NaN
    assert math.isnan(result[2])  # exp(-inf) * (-inf - x) = 0 * -inf
    assert result[3] == math.inf
    # log_target=True on log targets equals log_target=False on their exp where both are finite
    lt = np.log(np.array([0.2, 0.3, 0.5]))
    x = np.log(np.array([0.1, 0.6, 0.3]))
    np.testing.assert_allclose(
        torch_formula.torch_pointwise(x, lt, log_target=True), torch_formula.torch_pointwise(x, np.exp(lt)), rtol=1e-13
    )


def _torch_expected(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    flat = [
        0.0 if t == 0 else t * LOG(t) - t * i
        for i, t in zip(x.ravel().tolist(), y.ravel().tolist(), strict=True)
    ]
    return np.array(flat).reshape(x.shape)


@pytest.mark.parametrize(
    ("shape", "batch"),
    [((4,), 4), ((2, 3), 2), ((2, 3, 4), 2)],
    ids=["1d_divides_by_C", "2d_divides_by_B", "3d_divides_by_B_not_BS"],
)
def test_torch_reductions(shape: tuple[int, ...], batch: int) -> None:
    rng = _rng(f"test_oracle.torch_reductions.{shape}")
    y = rng.random(shape)
    y.reshape(-1)[0] = 0.0
    x = np.log(rng.random(shape))
    pointwise = _torch_expected(x, y)
    total = math.fsum(pointwise.ravel().tolist())
    np.testing.assert_allclose(torch_formula.torch_kl_div(x, y, reduction="none"), pointwise, rtol=1e-13, atol=1e-16)
    assert float(torch_formula.torch_kl_div(x, y, reduction="sum")) == pytest.approx(total, rel=1e-13)
    assert float(torch_formula.torch_kl_div(x, y, reduction="mean")) == pytest.approx(
        total / math.prod(shape), rel=1e-13
    )
    assert float(torch_formula.torch_kl_div(x, y)) == pytest.approx(total / math.prod(shape), rel=1e-13)  # default
    assert float(torch_formula.torch_kl_div(x, y, reduction="batchmean")) == pytest.approx(total / batch, rel=1e-13)


@pytest.mark.parametrize("reduction", ["batch_mean", "avg", "", "sum_over_batch_size"])
def test_torch_invalid_reduction(reduction: str) -> None:
    with pytest.raises(ValueError, match="unknown torch reduction"):
        torch_formula.torch_kl_div(np.log([0.5, 0.5]), np.array([0.5, 0.5]), reduction=reduction)


def test_torch_reduce_emits_no_warning_on_inf_minus_inf() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = torch_formula.torch_kl_div(np.array([math.inf, NINF]), np.array([0.5, 0.5]), reduction="sum")
    assert math.isnan(float(result))


# ------------------------------------------------------------------------- keras formula


def test_keras_epsilon_is_pinned() -> None:
    assert keras_formula.KERAS_EPSILON == 1e-7


def test_keras_clips_to_epsilon_and_one() -> None:
    eps = 1e-7
    # y_true [1, 0] -> [1, eps]; y_pred [0, 1] -> [eps, 1]
    got = float(keras_formula.keras_kl_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0]), reduction="none"))
    assert got == pytest.approx(1.0 * LOG(1.0 / eps) + eps * LOG(eps / 1.0), rel=1e-14)
    # values above 1 are clipped to 1
    got = float(keras_formula.keras_kl_divergence(np.array([2.0, 0.5]), np.array([0.5, 0.5]), reduction="none"))
    assert got == pytest.approx(LOG(2.0), rel=1e-14)


def test_keras_does_not_renormalise() -> None:
    got = float(keras_formula.keras_kl_divergence(np.array([0.2, 0.2]), np.array([0.5, 0.5]), reduction="none"))
    assert got == pytest.approx(2 * 0.2 * LOG(0.2 / 0.5), rel=1e-14)  # renormalised it would be 0
    assert got < -0.3


def _keras_rows(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    t = np.clip(y_true, 1e-7, 1.0).reshape(-1, y_true.shape[-1]).tolist()
    p = np.clip(y_pred, 1e-7, 1.0).reshape(-1, y_true.shape[-1]).tolist()
    rows = [
        math.fsum(a * LOG(a / b) for a, b in zip(tr, pr, strict=True)) for tr, pr in zip(t, p, strict=True)
    ]
    return np.array(rows).reshape(y_true.shape[:-1])


@pytest.mark.parametrize("reduction", [*keras_formula.KERAS_REDUCTIONS, None])
def test_keras_one_dimensional_input_is_never_reduced(reduction: str | None) -> None:
    y_true, y_pred = np.array([0.1, 0.0, 0.9]), np.array([0.3, 0.3, 0.4])
    result = keras_formula.keras_kl_divergence(y_true, y_pred, reduction=reduction)
    assert result.shape == ()
    assert float(result) == pytest.approx(float(_keras_rows(y_true, y_pred)), rel=1e-13)


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 5)])
def test_keras_reductions(shape: tuple[int, ...]) -> None:
    rng = _rng(f"test_oracle.keras_reductions.{shape}")
    y_true, y_pred = rng.random(shape), rng.random(shape)
    y_true.reshape(-1)[:3] = 0.0
    rows = _keras_rows(y_true, y_pred)
    total = math.fsum(rows.ravel().tolist())
    n_rows = math.prod(shape[:-1])  # B*S for (B, S, C)
    np.testing.assert_allclose(keras_formula.keras_kl_divergence(y_true, y_pred, reduction="none"), rows, rtol=1e-13)
    np.testing.assert_allclose(keras_formula.keras_kl_divergence(y_true, y_pred, reduction=None), rows, rtol=1e-13)
    assert float(keras_formula.keras_kl_divergence(y_true, y_pred, reduction="sum")) == pytest.approx(
        total, rel=1e-13
    )
    for reduction in ("sum_over_batch_size", "mean", "mean_with_sample_weight"):
        got = float(keras_formula.keras_kl_divergence(y_true, y_pred, reduction=reduction))
        assert got == pytest.approx(total / n_rows, rel=1e-13), reduction
    assert float(keras_formula.keras_kl_divergence(y_true, y_pred)) == pytest.approx(total / n_rows, rel=1e-13)


def test_keras_invalid_reduction() -> None:
    with pytest.raises(ValueError, match="unknown Keras reduction"):
        keras_formula.keras_kl_divergence(np.full((2, 2), 0.5), np.full((2, 2), 0.5), reduction="batchmean")


def test_keras_invalid_reduction_is_refused_for_one_dimensional_input() -> None:
    with pytest.raises(ValueError, match="unknown Keras reduction"):
        keras_formula.keras_kl_divergence(np.full(2, 0.5), np.full(2, 0.5), reduction="batchmean")


def test_keras_compute_max_overflow_gives_inf() -> None:
    y_true, y_pred = np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([[0.0, 1.0], [0.4, 0.6]])
    exact = keras_formula.keras_kl_divergence(y_true, y_pred, reduction="none")
    assert np.all(np.isfinite(exact)) and exact[0] > 16  # log(1e7) = 16.1
    fp16_max = 65504.0
    capped = keras_formula.keras_kl_divergence(y_true, y_pred, reduction="none", compute_max=fp16_max)
    assert capped[0] == math.inf  # 1 / 1e-7 overflows float16
    assert capped[1] == exact[1]  # ratios 1.25 and 0.83 do not
    assert float(keras_formula.keras_kl_divergence(y_true, y_pred, compute_max=fp16_max)) == math.inf


def test_keras_clip_gap_bound_is_zero_without_clipping() -> None:
    teacher, student, temperature = _random_distributions("test_oracle.gap_zero", (4, 10))
    p, q = oracle.softmax(teacher, temperature * 10), oracle.softmax(student, temperature * 10)
    assert p.min() > 1e-7 and q.min() > 1e-7
    assert keras_formula.keras_clip_gap_bound(p, q).tolist() == [0.0] * 4
    assert keras_formula.keras_clip_gap_bound([0.5, 0.5 - 1e-8, 1e-8], [0.3, 0.3, 0.4]) > 0


def test_keras_clip_gap_bound_bounds_the_actual_gap() -> None:
    rng = _rng("test_oracle.gap_bound")
    gaps = []
    for _ in range(20):
        temperature = _log_uniform(rng, 0.05, 0.5)
        teacher, student = rng.normal(0.0, 3.0, (4, 50)), rng.normal(0.0, 3.0, (4, 50))
        p, q = oracle.softmax(teacher, temperature), oracle.softmax(student, temperature)
        assert p.min() > 0 and q.min() > 0  # no underflow: the exact KL is finite
        exact = oracle.kl_from_probs(p, q)
        clipped = keras_formula.keras_kl_divergence(p, q, reduction="none")
        bound = keras_formula.keras_clip_gap_bound(p, q)
        gap = np.abs(clipped - exact)
        assert np.all(gap <= bound + 1e-14 * (1.0 + np.abs(exact))), (gap, bound)
        gaps.append(gap)
    assert np.max(gaps) > 1e-8  # clipping did matter somewhere: the bound was really exercised


def test_keras_clip_gap_bound_is_inf_when_exact_kl_is() -> None:
    assert float(keras_formula.keras_clip_gap_bound([0.5, 0.5], [1.0, 0.0])) == math.inf


# ------------------------------------------------------------------------- input validation

TWO_ARRAY_APIS: dict[str, Callable[[Any, Any], Any]] = {
    "kl_from_logits": oracle.kl_from_logits,
    "kl_from_log_probs": oracle.kl_from_log_probs,
    "kl_from_probs": oracle.kl_from_probs,
    "torch_kl_div": torch_formula.torch_kl_div,
    "torch_pointwise": torch_formula.torch_pointwise,
    "keras_kl_divergence": keras_formula.keras_kl_divergence,
    "keras_clip_gap_bound": keras_formula.keras_clip_gap_bound,
}


@pytest.mark.parametrize("api", TWO_ARRAY_APIS)
def test_shape_mismatch_is_refused(api: str) -> None:
    a, b = np.full((2, 3), 0.5), np.full((3,), 0.5)
    with pytest.raises(ValueError, match=r"shape mismatch.*\(2, 3\).*\(3,\)"):
        TWO_ARRAY_APIS[api](a, b)


@pytest.mark.parametrize(
    ("temperature", "message"),
    [
        (0.0, "must be > 0"),
        (-1.0, "must be > 0"),
        (-1e-300, "must be > 0"),
        (math.nan, "must be finite"),
        (math.inf, "must be finite"),
        (-math.inf, "must be finite"),
        (True, "must be a real number"),
        (np.bool_(True), "must be a real number"),
        ("1.0", "must be a real number"),
        (None, "must be a real number"),
        (1 + 0j, "must be a real number"),
    ],
    ids=repr,
)
def test_bad_temperature_is_refused(temperature: Any, message: str) -> None:
    t = np.array([1.0, 2.0])
    with pytest.raises(ValueError, match=message):
        oracle.kl_from_logits(t, t, temperature)
    with pytest.raises(ValueError, match=message):
        oracle.check_temperature(temperature)
    with pytest.raises(ValueError, match=message):
        oracle.softmax(t, temperature)


def test_good_temperatures_are_accepted() -> None:
    assert oracle.check_temperature(2) == 2.0
    assert oracle.check_temperature(np.float32(0.5)) == 0.5
    assert oracle.check_temperature(np.int64(3)) == 3.0
    t, s = np.array([1.0, 2.0]), np.array([2.0, 1.0])
    assert float(oracle.kl_from_logits(t, s, 2)) == float(oracle.kl_from_logits(t, s, 2.0))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_], ids=str)
def test_integer_dtype_is_refused(dtype: type) -> None:
    x: np.ndarray = np.array([1, 0, 1], dtype=dtype)
    with pytest.raises(ValueError, match=f"floating dtype.*got dtype {np.dtype(dtype).name}"):
        oracle.kl_from_logits(x, x)
    with pytest.raises(ValueError, match="floating dtype"):
        oracle.kl_from_probs(x, x)


def test_python_int_lists_are_refused() -> None:
    with pytest.raises(ValueError, match="floating dtype"):
        oracle.kl_from_logits([1, 2, 3], [1, 2, 3])


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128], ids=str)
def test_complex_dtype_is_refused(dtype: type) -> None:
    x: np.ndarray = np.array([1.0, 2.0], dtype=dtype)
    with pytest.raises(ValueError, match=r"floating dtype.*complex"):
        oracle.kl_from_logits(x, x)
    with pytest.raises(ValueError, match=r"floating dtype.*complex"):
        torch_formula.torch_kl_div(x, x)


@pytest.mark.parametrize("scalar", [1.0, np.float64(1.0), np.array(1.0)], ids=repr)
def test_scalar_input_is_refused(scalar: Any) -> None:
    with pytest.raises(ValueError, match="at least one axis"):
        oracle.kl_from_logits(scalar, scalar)
    with pytest.raises(ValueError, match="at least one axis"):
        keras_formula.keras_kl_divergence(scalar, scalar)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (2, 2, 0)])
def test_empty_class_axis_is_refused(shape: tuple[int, ...]) -> None:
    x = np.zeros(shape)
    with pytest.raises(ValueError, match="empty class axis"):
        oracle.kl_from_logits(x, x)
    with pytest.raises(ValueError, match="empty class axis"):
        oracle.kl_from_probs(x, x)


def test_negative_probabilities_are_refused() -> None:
    good = np.array([0.5, 0.5])
    with pytest.raises(ValueError, match="must be >= 0"):
        oracle.kl_from_probs(np.array([1.5, -0.5]), good)
    with pytest.raises(ValueError, match="must be >= 0"):
        oracle.kl_from_probs(good, np.array([1.0001, -0.0001]))
    assert float(oracle.kl_from_probs(np.array([-0.0, 1.0]), np.array([0.5, 0.5]))) == pytest.approx(LOG(2.0))


def test_overflowing_logits_over_temperature_emit_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = oracle.kl_from_logits(np.array([1e307, 0.0]), np.array([1e307, 1.0]), 0.05)
    assert float(result) == 0.0  # p = q = [1, 0] to float64 precision


# ------------------------------------------------------------------------- properties (hypothesis)


@st.composite
def logit_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, float]:
    """Two rows of C in [2, 12] logits, each a multiple of 2**-20 in [-30, 30], and T in [0.05, 1000]."""
    c = draw(st.integers(2, 12))
    grid = st.integers(-30 * 2**20, 30 * 2**20).map(lambda k: k / 2**20)
    teacher = np.array(draw(st.lists(grid, min_size=c, max_size=c)))
    student = np.array(draw(st.lists(grid, min_size=c, max_size=c)))
    temperature = draw(st.floats(0.05, 1000.0))
    return teacher, student, temperature


@HYPOTHESIS
@given(logit_pairs())
def test_property_kl_is_non_negative(case: tuple[np.ndarray, np.ndarray, float]) -> None:
    teacher, student, temperature = case
    assert float(oracle.kl_from_logits(teacher, student, temperature)) >= -1e-15
    p, q = oracle.softmax(teacher, temperature), oracle.softmax(student, temperature)
    assert float(oracle.kl_from_probs(p / p.sum(), q / q.sum())) >= -1e-12


@HYPOTHESIS
@given(logit_pairs())
def test_property_kl_of_a_distribution_with_itself_is_zero(
    case: tuple[np.ndarray, np.ndarray, float],
) -> None:
    teacher, _, temperature = case
    assert float(oracle.kl_from_logits(teacher, teacher.copy(), temperature)) == 0.0
    p = oracle.softmax(teacher, temperature)
    assert float(oracle.kl_from_probs(p, p.copy())) == 0.0
    lp = oracle.log_softmax(teacher, temperature)
    assert float(oracle.kl_from_log_probs(lp, lp.copy())) == 0.0


@HYPOTHESIS
@given(logit_pairs(), st.integers(-30 * 2**20, 30 * 2**20), st.booleans())
def test_property_adding_a_constant_to_a_row_changes_nothing(
    case: tuple[np.ndarray, np.ndarray, float], k: int, shift_teacher: bool
) -> None:
    """Softmax is shift-invariant. The constant is on the same 2**-20 grid as the logits, so the
    shifted logits are exact and only the oracle's own rounding can make a difference."""
    teacher, student, temperature = case
    c = k / 2**20
    before = float(oracle.kl_from_logits(teacher, student, temperature))
    if shift_teacher:
        after = float(oracle.kl_from_logits(teacher + c, student, temperature))
    else:
        after = float(oracle.kl_from_logits(teacher, student + c, temperature))
    assert abs(after - before) <= 1e-12 * abs(before) + 1e-15, (before, after)
