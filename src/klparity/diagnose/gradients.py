"""What a hypothesis predicts for the gradient w.r.t. the student logits (analytic, or a framework's clipped
formula differentiated by its record), with its tolerance, and the check of an observed gradient against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from klparity.diagnose.catalogue import CLIPPABLE, Hypothesis
from klparity.diagnose.conventions import jsd_beta
from klparity.diagnose.prediction import ONE_SIDED, Prepared, formula_logs
from klparity.diagnose.records import divisor, role
from klparity.numerics import oracle
from klparity.numerics.dtypes import dtype_info
from klparity.numerics.errormodel import GradBudget, grad_budget, table_row, user_loss_grad_budget
from klparity.numerics.exact_grads import exact_student_grad, exact_teacher_grad

#: The record's clipped formula differentiated exactly (``records.role``).
CLIPPED_GRADS: Final[Callable[..., tuple[F64, F64]]] = role("clipped_grads")

F64 = NDArray[np.float64]
GradModel = tuple[F64, Callable[[float], F64]]


def grad_model(formula: str, prep: Prepared, clipped: bool) -> GradModel | None:
    """d(per-row value)/d(student logits) of a formula and its tolerance as a function of the scale.

    None where the formula's gradient is not modelled. The tolerance is ``tolerances.grad_budget`` on
    the formula's own distributions: its student form for KL(P‖Q) in Q's logits, its teacher form
    for KL(Q‖P) (arguments swapped: the student is differentiated as the target).
    """
    if clipped:
        return _clipped_grad_model(formula, prep)
    ex, temp = prep.ex, prep.ex.temperature

    def gb(lp: F64, lq: F64, zt: F64, zs: F64, t_div: float) -> GradBudget:
        with np.errstate(invalid="ignore", over="ignore"):
            p, q = np.exp(lp), np.exp(lq)
            h = np.where(p > 0, lp + 1.0 - lq, 0.0)
        return user_loss_grad_budget(
            grad_budget(
                framework=prep.framework,
                input_dtype=prep.obs.dtype,
                compute_dtype=prep.compute,
                temperature=t_div,
                weight=p,
                p=p,
                q=q,
                h=h,
                zt=zt,
                zs=zs,
                log_p=lp,
                log_q=lq,
                student_is_probability=False,
            )
        )

    if formula in ("exact", "cross-entropy"):  # H(teacher) does not depend on the student
        return exact_student_grad(ex.teacher, ex.student, temp), gb(ex.lp, ex.lq, ex.zt, ex.zs, temp).student
    beta = jsd_beta(formula)
    if beta is not None:  # d JSD / d q_j = (1 − β) log(q_j / m_j), through the softmax of s / T
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            lm = oracle.log_mixture(ex.lp, ex.lq, beta)
            g = np.where(ex.q > 0, (1.0 - beta) * (ex.lq - lm), 0.0)
            grad = ex.q * (g - np.sum(ex.q * g, axis=-1, keepdims=True)) / temp
        fwd, rev = gb(ex.lp, ex.lq, ex.zt, ex.zs, temp).student, gb(ex.lq, ex.lp, ex.zs, ex.zt, temp).teacher
        return np.asarray(grad, np.float64), lambda scale: np.asarray(fwd(scale) + rev(scale), np.float64)
    if formula in ONE_SIDED:
        lp, lq, zt, zs, ts = formula_logs(formula, ex)
        return np.asarray((np.exp(lq) - np.exp(lp)) / ts, np.float64), gb(lp, lq, zt, zs, ts).student
    if formula == "swapped":  # d KL(softmax(s/T) ‖ softmax(t/T)) / d s: the first argument's gradient
        return exact_teacher_grad(ex.student, ex.teacher, temp), gb(ex.lq, ex.lp, ex.zs, ex.zt, temp).teacher
    if formula == "probs-input":  # d/ds_k of -sum_j p_j q_j = -(q_k / T) (p_k - sum_j p_j q_j)
        pq = np.sum(ex.p * ex.q, axis=-1, keepdims=True)
        grad = np.asarray(-ex.q * (ex.p - pq) / temp, np.float64)
        return grad, gb(ex.lp, ex.lq, ex.zt, ex.zs, temp).student  # magnitudes q_k p_k <= p_k: bounded alike
    return None


def _clip_masks(prep: Prepared, x: F64, z: F64) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """(surely passes, surely clipped) for Keras's clip of probabilities ``x`` to [eps, 1].

    The framework's probability carries the softmax stage's relative error (``c_in`` of the tolerance
    row, in the coarser of the input and compute dtypes); within it of eps the clip could go either way.
    """
    u = max(dtype_info(prep.obs.dtype).unit_roundoff, dtype_info(prep.compute).unit_roundoff)
    c_in = table_row(prep.framework, prep.obs.dtype).c_in
    log2c = math.log2(max(x.shape[-1], 2))
    with np.errstate(invalid="ignore"):
        fin = np.isfinite(z)
        m = np.max(np.where(fin, np.abs(z), 0.0), axis=-1, keepdims=True)
        band = c_in * u * (np.where(fin, np.abs(z), 0.0) + m + log2c + 1.0)
        # as apis.keras_kl_divergence.clip_passes: a NaN passes the clip (and its gradient)
        return np.asarray(~((x * (1.0 - band) < prep.eps) | (x > 1.0))), np.asarray(x * (1.0 + band) < prep.eps)


def _clipped_grad_model(formula: str, prep: Prepared) -> GradModel | None:
    """Keras's clipped formula differentiated exactly (``apis.keras_kl_divergence.keras_grads``), for the
    student logits.

    A class whose y_pred is within rounding of eps may or may not pass the clip: it is taken as clipped,
    and the tolerance gains what passing would change, (a_k + q_k sum_j a_j) / T with a_j its clipped y_true.
    """
    if formula not in CLIPPABLE:
        return None
    ex = prep.ex
    lp, lq, zp, zq, t_div = formula_logs(formula, ex)
    swapped = formula == "swapped"
    if swapped:  # KL(q‖p): the student is y_true
        lp, lq, zp, zq = lq, lp, zq, zp
    p, q = np.exp(lp), np.exp(lq)
    mt, _ = _clip_masks(prep, p, zp)
    mp, clipped_p = _clip_masks(prep, q, zq)
    g_pred, g_true = CLIPPED_GRADS(p, q, t_div, epsilon=prep.eps, mask_true=mt, mask_pred=mp)
    t, u = np.where(mt, p, prep.eps), np.where(mp, q, prep.eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(mt, np.log(t / u) + 1.0, 0.0)
    gb = user_loss_grad_budget(
        grad_budget(
            framework=prep.framework,
            input_dtype=prep.obs.dtype,
            compute_dtype=prep.compute,
            temperature=t_div,
            weight=np.where(mp, t, 0.0),
            p=p,
            q=q,
            h=h,
            zt=zp,
            zs=zq,
            log_p=lp,
            log_q=lq,
            student_is_probability=True,
        )
    )
    if swapped:
        return g_true, gb.teacher
    a = np.where(~mp & ~clipped_p, np.clip(p, prep.eps, 1.0), 0.0)
    borderline = np.asarray((a + q * np.sum(a, axis=-1, keepdims=True)) / t_div, np.float64)
    return g_pred, lambda scale: np.asarray(gb.student(scale) + scale * borderline, np.float64)


@dataclass(frozen=True)
class GradCheck:
    """Gradient of one observation against a hypothesis: reference, and the verdict."""

    ok: bool
    worst: float  #: max |error| / tolerance over finite entries
    reference: F64 | None


def grad_factor(h: Hypothesis, prep: Prepared) -> float:
    """What the reduction and the temperature factor multiply each row's gradient by."""
    return prep.ex.temperature**h.power / divisor(h.reduction.name, prep.shape)


def check_grad(h: Hypothesis, prep: Prepared) -> GradCheck:
    """Compare the observed gradient with the one ``h`` predicts (exact, or Keras's clipped formula).

    NaN overlays are not modelled here: callers leave out the runs whose rows they decide.
    """
    model = grad_model(h.formula, prep, h.clipped)
    if model is None:
        return GradCheck(False, math.inf, None)
    g_rows, tolerance = model
    factor = grad_factor(h, prep)
    ref = np.asarray(g_rows * factor, np.float64)
    obs = prep.obs.grad
    if obs is None:
        return GradCheck(False, math.inf, ref)
    tol = tolerance(abs(factor))
    nan_o, nan_r = np.isnan(obs), np.isnan(ref)
    if obs.shape != ref.shape or np.any(nan_o != nan_r):
        return GradCheck(False, math.inf, ref)
    fin = ~nan_r
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        err = np.abs(obs[fin] - ref[fin])
        t = tol[fin]
        ratio = np.where(t > 0, err / t, np.where(err == 0, 0.0, np.inf))
    worst = float(np.max(ratio)) if ratio.size else 0.0
    return GradCheck(worst <= 1.0, worst, ref)
