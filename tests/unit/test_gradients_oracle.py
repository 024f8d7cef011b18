"""Self-tests of the float64 gradient references (``klparity.engine.gradients``), without any framework.

The exact gradients and the hand-derived API formulas are checked against mpmath central differences
of the loss itself (100 digits, step 1e-20: truncation ~1e-40 relative), which share no code with
the derivations; the judging bound is the float64 gradient budget of ``klparity.numerics.errormodel``. Small
hand examples pin the quirks (torch's NaN at a zero target, Keras's clip, float16 overflow).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import mpmath as mp
import numpy as np
import pytest

from klparity.apis import SPECS
from klparity.apis.keras_kl_divergence import clip_passes, keras_clip_grad_gap_bound, keras_grads
from klparity.apis.keras_kl_divergence import formula as keras_formula
from klparity.apis.torch_kl_div import torch_grads
from klparity.numerics import goldens
from klparity.numerics.errormodel import GradBudget, grad_budget, subnormal_error
from klparity.numerics.exact import exact_of
from klparity.numerics.exact_grads import exact_student_grad, exact_teacher_grad

F64 = np.ndarray
MP_DPS = 100  # the quotient loses 20 digits to the step and ~40 to the smallest gradients
STEP = mp.mpf("1e-20")


def _rng(test_id: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(test_id.encode("utf-8")))


def _budget(teacher: F64, student: F64, temperature: float, *, keras: bool = False) -> GradBudget:
    """The float64 gradient budget of the suite (the oracle is a float64 computation like any other)."""
    ex = exact_of(teacher, student, temperature)
    with np.errstate(invalid="ignore", divide="ignore"):
        if keras:
            t, u = np.clip(ex.p, keras_formula.KERAS_EPSILON, 1.0), np.clip(ex.q, keras_formula.KERAS_EPSILON, 1.0)
            h = np.log(t / u) + 1.0
            weight = np.where(ex.q >= keras_formula.KERAS_EPSILON, t, 0.0)
        else:
            h = np.where(ex.p > 0, ex.lp + 1.0 - ex.lq, 0.0)
            weight = ex.p
    return grad_budget(framework="numpy", input_dtype="float64", compute_dtype="float64",
                       temperature=temperature, weight=weight, p=ex.p, q=ex.q, h=h, zt=ex.zt, zs=ex.zs,
                       log_p=ex.lp, log_q=ex.lq, student_is_probability=keras)  # fmt: skip


# ------------------------------------------------------------------------------- mpmath losses


def _mp_softmax(row: Sequence[mp.mpf], temperature: mp.mpf) -> list[mp.mpf]:
    z = [v / temperature for v in row]
    m = max(z)
    e = [mp.exp(v - m) for v in z]
    s = mp.fsum(e)
    return [v / s for v in e]


def _mp_kl(teacher: Sequence[mp.mpf], student: Sequence[mp.mpf], temperature: mp.mpf) -> mp.mpf:
    p, q = _mp_softmax(teacher, temperature), _mp_softmax(student, temperature)
    return mp.fsum(a * (mp.log(a) - mp.log(b)) for a, b in zip(p, q, strict=True))


def _mp_keras(teacher: Sequence[mp.mpf], student: Sequence[mp.mpf], temperature: mp.mpf) -> mp.mpf:
    eps = mp.mpf(keras_formula.KERAS_EPSILON)
    p, q = _mp_softmax(teacher, temperature), _mp_softmax(student, temperature)
    t = [min(max(a, eps), mp.mpf(1)) for a in p]
    u = [min(max(b, eps), mp.mpf(1)) for b in q]
    return mp.fsum(a * mp.log(a / b) for a, b in zip(t, u, strict=True))


Loss = Callable[[Sequence[mp.mpf], Sequence[mp.mpf], mp.mpf], mp.mpf]


def _mp_grads(loss: Loss, teacher: F64, student: F64, temperature: float) -> tuple[F64, F64]:
    """Central differences of ``loss`` per row, w.r.t. the student and the teacher logits."""
    gs, gt = np.zeros_like(student), np.zeros_like(teacher)
    with mp.workdps(MP_DPS):
        temp = mp.mpf(temperature)
        for r in np.ndindex(teacher.shape[:-1]):
            t = [mp.mpf(float(v)) for v in teacher[r]]
            s = [mp.mpf(float(v)) for v in student[r]]
            for k in range(len(t)):
                for row, out, other, first in ((s, gs, t, False), (t, gt, s, True)):
                    plus, minus = list(row), list(row)
                    plus[k] += STEP
                    minus[k] -= STEP
                    args_p = (plus, other) if first else (other, plus)
                    args_m = (minus, other) if first else (other, minus)
                    out[(*r, k)] = float((loss(*args_p, temp) - loss(*args_m, temp)) / (2 * STEP))
    return gs, gt


def _within(got: F64, ref: F64, tol: F64, what: str) -> None:
    err = np.abs(got - ref)
    bad = err > tol
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.size} entries off, worst {float(np.max(err / tol)):.3g}x the "
        f"float64 budget at {tuple(int(i) for i in np.argwhere(bad)[0])}"
    )


CASES = [
    ("gauss3_4x10_T1", (4, 10), 3.0, 1.0),
    ("gauss10_3x7_T2", (3, 7), 10.0, 2.0),
    ("gauss1_2x2x5_T0.5", (2, 2, 5), 1.0, 0.5),
    ("gauss3_6_T5", (6,), 3.0, 5.0),
]


@pytest.mark.parametrize("name,shape,scale,temperature", CASES, ids=[c[0] for c in CASES])
def test_exact_gradients_match_mpmath_central_differences(
    name: str, shape: tuple[int, ...], scale: float, temperature: float
) -> None:
    rng = _rng(name)
    teacher, student = rng.normal(0.0, scale, shape), rng.normal(0.0, scale, shape)
    mp_s, mp_t = _mp_grads(_mp_kl, teacher, student, temperature)
    bud = _budget(teacher, student, temperature)
    _within(exact_student_grad(teacher, student, temperature), mp_s, bud.student(1.0), "d/ds")
    _within(exact_teacher_grad(teacher, student, temperature), mp_t, bud.teacher(1.0), "d/dt")


@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("name,shape,scale,temperature", CASES, ids=[c[0] for c in CASES])
def test_torch_formula_equals_the_exact_gradient_on_finite_inputs(
    name: str, shape: tuple[int, ...], scale: float, temperature: float, log_target: bool
) -> None:
    rng = _rng(name)
    teacher, student = rng.normal(0.0, scale, shape), rng.normal(0.0, scale, shape)
    ex = exact_of(teacher, student, temperature)
    g_s, g_t = torch_grads(ex.lp if log_target else ex.p, ex.lq, temperature, log_target=log_target)
    bud = _budget(teacher, student, temperature)
    _within(g_s, exact_student_grad(teacher, student, temperature), bud.student(1.0), "torch d/ds")
    _within(g_t, exact_teacher_grad(teacher, student, temperature), bud.teacher(1.0), "torch d/dt")


def test_exact_student_gradient_matches_the_mpmath_goldens() -> None:
    """The goldens' d KL / d s (mpmath, rounded once) for every float64 golden."""
    checked = 0
    for g in goldens.load():
        if g.dtype != "float64" or not np.all(np.isfinite(g.grad)):
            continue
        bud = _budget(g.teacher, g.student, g.temperature)
        _within(exact_student_grad(g.teacher, g.student, g.temperature), g.grad, bud.student(1.0), g.id)
        checked += 1
    assert checked >= 5


KERAS_CASES = [
    # (name, shape, logit scale, temperature): the low temperatures clip many classes
    ("kgauss3_3x12_T1", (3, 12), 3.0, 1.0),
    ("kgauss3_3x12_T0.3", (3, 12), 3.0, 0.3),
    ("kspread_2x8_T0.5", (2, 8), 6.0, 0.5),
]


@pytest.mark.parametrize("name,shape,scale,temperature", KERAS_CASES, ids=[c[0] for c in KERAS_CASES])
def test_keras_clipped_gradient_matches_mpmath_central_differences(
    name: str, shape: tuple[int, ...], scale: float, temperature: float
) -> None:
    rng = _rng(name)
    teacher, student = rng.normal(0.0, scale, shape), rng.normal(0.0, scale, shape)
    ex = exact_of(teacher, student, temperature)
    eps = keras_formula.KERAS_EPSILON
    # central differences straddle the clip's kink only within STEP of eps: keep away from it
    assert np.all(np.abs(np.log(ex.q / eps)) > 1e-6) and np.all(np.abs(np.log(ex.p / eps)) > 1e-6)
    mp_s, mp_t = _mp_grads(_mp_keras, teacher, student, temperature)
    g_s, g_t = keras_grads(ex.p, ex.q, temperature)
    bud = _budget(teacher, student, temperature, keras=True)
    _within(g_s, mp_s, bud.student(1.0), "keras d/ds")
    _within(g_t, mp_t, bud.teacher(1.0), "keras d/dt")
    # T = 1: nothing below eps, the clipped gradient is the exact one; lower T: it is not, within the bound
    exact = exact_student_grad(teacher, student, temperature)
    clipped = bool(np.any(ex.q < eps))
    assert clipped == (temperature < 1.0)
    assert bool(np.any(np.abs(g_s - exact) > bud.student(1.0))) == clipped
    bound = keras_clip_grad_gap_bound(ex.p, ex.q, ex.p >= eps, ex.q >= eps, eps, temperature)
    _within(g_s, exact, bound + bud.student(1.0), "keras gap bound")


def test_keras_clip_gives_no_gradient_below_epsilon() -> None:
    """q_0 < eps: class 0 gets only q_0 S; the others get (q_k S - t_k)/T with S = sum_{k >= 1} t_k."""
    p = np.array([[0.3, 0.3, 0.4 - 1e-9, 1e-9]])
    q = np.array([[1e-9, 0.5, 0.3, 0.2 - 1e-9]])
    g_s, _ = keras_grads(p, q, 2.0)
    t = np.clip(p, keras_formula.KERAS_EPSILON, 1.0)
    s = t[0, 1:].sum()
    expected = np.concatenate([[q[0, 0] * s], q[0, 1:] * s - t[0, 1:]])[None] / 2.0
    bud = _budget(np.log(p), np.log(q), 1.0, keras=True)  # softmax(log p) = p, at T = 1
    _within(g_s, expected, bud.student(0.5), "keras clip by hand")
    exact = (q - p) / 2.0
    assert abs(g_s[0, 0] - exact[0, 0]) > abs(exact[0, 0]) / 2  # the cut class lost its gradient


def test_keras_float16_division_gradient_overflows() -> None:
    """(-t/u)/u above 65504 in float16 is -inf: the row is inf/NaN unless the clip masks the class."""
    # row 0: 0.25 / 1e-4 / 1e-4 overflows; row 1: 5e-8 is clipped (and 0.005 / eps stays below 65504)
    y_true = np.array([[0.5, 0.25, 0.25], [0.5, 0.495, 0.005]])
    y_pred = np.array([[0.5, 0.4999, 1e-4], [0.5, 0.5 - 5e-8, 5e-8]])
    g_s, g_t = keras_grads(y_true, y_pred, 1.0, epsilon=1.1920928955078125e-07, compute="float16")
    assert not np.all(np.isfinite(g_s[0])) and np.isnan(g_s[0, 2])
    assert np.all(np.isfinite(g_s[1])) and np.all(np.isfinite(g_t))
    plain_s, _ = keras_grads(y_true, y_pred, 1.0, epsilon=1.1920928955078125e-07)
    assert np.all(np.isfinite(plain_s))


def test_torch_target_gradient_is_nan_at_a_zero_target() -> None:
    """xlogy's backward is 0/0 at t = 0 and the softmax backward spreads it; the input gradient is fine."""
    with np.errstate(divide="ignore"):
        lt = np.log(np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]))
    target = np.exp(lt)
    inp = np.log(np.array([[0.2, 0.3, 0.5], [0.5, 0.25, 0.25]]))
    g_s, g_t = torch_grads(target, inp, 1.0, log_target=False)
    assert np.all(np.isnan(g_t[0])) and np.all(np.isfinite(g_t[1]))
    _within(g_s, np.exp(inp) - target, _budget(lt, inp, 1.0).student(1.0), "torch d/ds at a zero target")
    _, g_t_log = torch_grads(lt, inp, 1.0, log_target=True)
    assert np.all(np.isnan(g_t_log[0])) and np.all(np.isfinite(g_t_log[1]))


def test_nan_logits_give_nan_gradient_rows_only() -> None:
    teacher = np.array([[1.0, np.nan, 0.0], [1.0, 2.0, 0.0]])
    student = np.array([[0.0, 1.0, 2.0], [0.5, 0.0, -1.0]])
    for g in (exact_student_grad(teacher, student, 1.0), exact_teacher_grad(teacher, student, 1.0)):
        assert np.all(np.isnan(g[0])) and np.all(np.isfinite(g[1]))
    ex = exact_of(teacher, student, 1.0)
    for g in (*torch_grads(ex.p, ex.lq, 1.0, log_target=False), *keras_grads(ex.p, ex.q, 1.0)):
        assert np.all(np.isnan(g[0])) and np.all(np.isfinite(g[1]))


def test_exact_teacher_gradient_sums_to_zero_and_vanishes_at_p_equal_q() -> None:
    """d/dt is p (d - KL)/T: its row sum is sum p d - KL = 0; at p = q it is 0 exactly."""
    rng = _rng("teacher_sum")
    teacher, student = rng.normal(0.0, 3.0, (5, 50)), rng.normal(0.0, 3.0, (5, 50))
    g = exact_teacher_grad(teacher, student, 2.0)
    bud = _budget(teacher, student, 2.0)
    assert np.all(np.abs(g.sum(axis=-1)) <= bud.teacher(1.0).sum(axis=-1))
    assert np.all(exact_teacher_grad(teacher, teacher, 2.0) == 0.0)
    assert np.all(exact_student_grad(teacher, teacher, 2.0) == 0.0)


@pytest.mark.parametrize(
    "semantics,reduction,shape,divisor",
    [
        ("torch", "sum", (8, 10), 1), ("torch", "none", (8, 10), 1), ("torch", "mean", (8, 10), 80),
        ("torch", "default", (8, 10), 80), ("torch", "batchmean", (8, 10), 8), ("torch", "batchmean", (10,), 10),
        ("torch", "batchmean", (2, 3, 10), 2), ("torch", "mean", (2, 3, 10), 60),
        ("keras", "sum_over_batch_size", (8, 10), 8), ("keras", "default", (2, 3, 10), 6),
        ("keras", "mean_with_sample_weight", (2, 3, 10), 6), ("keras", "sum", (2, 3, 10), 1),
        ("keras", "sum_over_batch_size", (10,), 1), ("keras", "mean", (10,), 1),
    ],
)  # fmt: skip
def test_reduction_scales(semantics: str, reduction: str, shape: tuple[int, ...], divisor: int) -> None:
    assert SPECS[semantics].grad_scale(reduction, shape) == 1.0 / divisor


def test_unknown_reduction_or_semantics_raise() -> None:
    with pytest.raises(ValueError, match="unknown torch reduction"):
        SPECS["torch"].grad_scale("sum_over_batch_size", (2, 3))
    assert not SPECS["optax"].has_gradients()  # its gradient cells are not collected
    with pytest.raises(NotImplementedError):
        SPECS["optax"].grad_scale("none", (2, 3))


def test_budget_grows_with_the_scale_and_the_dtype() -> None:
    rng = _rng("budget")
    teacher, student = rng.normal(0.0, 3.0, (4, 100)), rng.normal(0.0, 3.0, (4, 100))
    ex = exact_of(teacher, student, 1.0)
    h = ex.lp + 1.0 - ex.lq

    def bud(dtype: str) -> GradBudget:
        return grad_budget(framework="torch", input_dtype=dtype, compute_dtype=dtype, temperature=1.0,
                           weight=ex.p, p=ex.p, q=ex.q, h=h, zt=ex.zt, zs=ex.zs, log_p=ex.lp, log_q=ex.lq,
                           student_is_probability=False)  # fmt: skip

    b16, b32, b64 = bud("float16"), bud("float32"), bud("float64")
    assert np.all(b16.student(1.0) > b32.student(1.0)) and np.all(b32.student(1.0) > b64.student(1.0))
    assert np.all(b32.teacher(0.5) < b32.teacher(1.0)) and np.all(b64.student(0.25) < b64.student(1.0))


def test_keras_nan_teacher_class_clipped_on_the_student_side_leaves_a_finite_student_gradient() -> None:
    """TF's clip passes the gradient of a NaN (NaN < eps is False) but zeroes it where y_pred < eps."""
    y_true = np.array([[0.0, np.nan, 0.0], [0.0, np.nan, 0.0]])  # TF float32 softmax of a row with a NaN
    y_pred = np.array([[0.5, 1e-9, 0.5 - 1e-9], [0.25, 0.5, 0.25]])  # row 0: the NaN class is clipped
    assert np.all(clip_passes(y_true, keras_formula.KERAS_EPSILON)[:, 1])
    g_s, g_t = keras_grads(y_true, y_pred, 1.0)
    assert np.all(np.isfinite(g_s[0])) and np.all(np.isnan(g_s[1]))
    assert np.all(np.isnan(g_t))


def test_float16_rounding_decides_overflow_at_the_boundary() -> None:
    """t / u / u just below 65520 exact, but -t / u rounded to float16 first pushes it over."""
    t, u = 1.5854835510253906e-05, 1.5556812286376953e-05  # measured in a float16 Keras row
    y_true, y_pred = np.array([[t, 1.0 - t]]), np.array([[u, 1.0 - u]])
    assert t / u / u < 65520
    g_s, _ = keras_grads(y_true, y_pred, 1.0, epsilon=1.1920928955078125e-07, compute="float16")
    assert np.isnan(g_s[0, 0])  # (-inf - (-inf)) * y
    exact_s, _ = keras_grads(y_true, y_pred, 1.0, epsilon=1.1920928955078125e-07)
    assert np.all(np.isfinite(exact_s))


def test_float64_subnormal_error_is_not_zero() -> None:
    """Half the smallest float64 subnormal rounds to 0: the floor must not vanish."""
    assert subnormal_error("torch", "float64") > 0
    assert subnormal_error("tensorflow", "float32") == np.finfo(np.float32).smallest_normal
    assert subnormal_error("torch", "float16") == np.finfo(np.float16).smallest_subnormal / 2
