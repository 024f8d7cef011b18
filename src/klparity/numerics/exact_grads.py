"""The exact gradient of KL(softmax(t/T) ‖ softmax(s/T)) w.r.t. both logits, in float64, and the small
array helpers the API specs' hand-differentiated formulas share (row sums, exp and rounding in a dtype).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from klparity.numerics import oracle
from klparity.numerics.dtypes import round_to, widen

if TYPE_CHECKING:
    from klparity.model import Exact

F64 = NDArray[np.float64]


# ------------------------------------------------------------------------------ exact gradient


def exact_student_grad(teacher: F64, student: F64, temperature: float) -> F64:
    """d KL(softmax(t/T) || softmax(s/T)) / d s, per element: (q - p) / T. NaN rows stay NaN."""
    lp, lq = oracle.log_softmax(teacher, temperature), oracle.log_softmax(student, temperature)
    return _student_grad(lp, lq, temperature)


def exact_teacher_grad(teacher: F64, student: F64, temperature: float) -> F64:
    """d KL / d t, per element: p_k (log p_k - log q_k - KL) / T; 0 where p_k = 0.

    Where the student is -inf under teacher mass KL is +inf and the formula gives NaN / -inf (IEEE
    arithmetic on the infinite KL); NaN rows stay NaN.
    """
    lp, lq = oracle.log_softmax(teacher, temperature), oracle.log_softmax(student, temperature)
    return _teacher_grad(lp, lq, oracle.kl_from_logits(teacher, student, temperature), temperature)


def _student_grad(lp: F64, lq: F64, temperature: float) -> F64:
    return np.asarray((np.exp(lq) - np.exp(lp)) / temperature, np.float64)


def _teacher_grad(lp: F64, lq: F64, kl: F64, temperature: float) -> F64:
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(lp)
        g = p * ((lp - lq) - kl[..., None]) / temperature
    return np.asarray(np.where(p == 0, 0.0, g), np.float64)


def exact_grads(ex: Exact) -> tuple[F64, F64]:
    """``exact_student_grad`` and ``exact_teacher_grad`` of a case, from its log-probabilities (the
    KL from ``oracle.kl_from_logits`` whichever oracle made ``ex.rows``)."""
    kl = oracle.kl_from_logits(ex.teacher, ex.student, ex.temperature)
    return _student_grad(ex.lp, ex.lq, ex.temperature), _teacher_grad(ex.lp, ex.lq, kl, ex.temperature)


def rowsum(x: F64) -> F64:
    return np.asarray(np.sum(x, axis=-1, keepdims=True), np.float64)


def exp_in(x: F64, dtype: str | None) -> F64:
    """exp(x), rounded to ``dtype`` (so that it underflows to 0 where the framework's does)."""
    with np.errstate(over="ignore"):
        e = np.exp(x)
    return e if dtype is None else widen(round_to(e, dtype))


def rounded_to(x: F64, dtype: str | None) -> F64:
    """``x`` rounded to ``dtype`` (to nearest; beyond its range to +-inf), widened back; None: as is."""
    if dtype is None or dtype == "float64":
        return x
    with np.errstate(over="ignore", invalid="ignore"):
        return widen(round_to(x, dtype))
