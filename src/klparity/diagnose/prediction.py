"""What a hypothesis predicts for one observation: the oracle's quantities of its case (computed once), the
per-row value of each formula with its error budget, reduced and scaled; and whether an observed value matches.

The formulas are the oracle's (``klparity.numerics.oracle``) and the API records' (``formula`` modules).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import NDArray

from klparity.diagnose.catalogue import CLIPPABLE, Hypothesis
from klparity.diagnose.conventions import jsd_beta
from klparity.diagnose.observe import Observation
from klparity.diagnose.records import reduce, role
from klparity.model import Exact
from klparity.numerics import oracle
from klparity.numerics.dtypes import DTYPE_NAMES, dtype_info, round_to, widen
from klparity.numerics.errormodel import Budget, budget, user_loss_budget
from klparity.numerics.exact import exact_of

#: The records' formulas the hypotheses evaluate (``records.role``): a clipped per-row KL and its epsilon,
#: a log-space pointwise loss.
CLIPPED_ROWS: Final[Callable[..., F64]] = role("clipped_rows")
CLIP_EPSILON: Final[float] = role("clip_epsilon")
POINTWISE: Final[Callable[..., F64]] = role("log_space_pointwise")

F64 = NDArray[np.float64]

#: Formulas with the temperature on one side or none: (T of the teacher, T of the student), None for the case's.
ONE_SIDED: Final = {"student-T": (1.0, None), "teacher-T": (None, 1.0), "no-T": (1.0, 1.0)}


def formula_logs(formula: str, ex: Exact) -> tuple[F64, F64, F64, F64, float]:
    """(log P, log Q, z^P, z^Q, T of the student) of a probability-space formula KL(P‖Q), before any swap."""
    temp = ex.temperature
    if formula in ONE_SIDED:
        tt, ts = (temp if v is None else v for v in ONE_SIDED[formula])
        return oracle.log_softmax(ex.teacher, tt), oracle.log_softmax(ex.student, ts), ex.teacher / tt, \
            ex.student / ts, ts  # fmt: skip
    return ex.lp, ex.lq, ex.zt, ex.zs, temp


@dataclass
class Prepared:
    """Oracle quantities of one observation, computed once; formula rows and budgets on demand."""

    obs: Observation
    ex: Exact
    framework: str
    compute: str
    eps: float
    _rows: dict[tuple[str, bool], tuple[F64, Budget]] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.obs.case.shape

    def _kl(self, lp: F64, lq: F64, zt: F64, zs: F64, clipped: bool) -> tuple[F64, Budget]:
        p, q = np.exp(lp), np.exp(lq)
        if clipped:
            pt, qt = np.clip(p, self.eps, 1.0), np.clip(q, self.eps, 1.0)
            rows = CLIPPED_ROWS(p, q, reduction=None, epsilon=self.eps)
            return rows, self._budget(pt, qt, zt, zs, None, None, True)
        return oracle.kl_from_log_probs(lp, lq), self._budget(p, q, zt, zs, lp, lq, False)

    def _budget(self, p: F64, q: F64, zt: F64, zs: F64, lp: F64 | None, lq: F64 | None, prob: bool) -> Budget:
        b = budget(framework=self.framework, input_dtype=self.obs.dtype, compute_dtype=self.compute,
                   p=p, q=q, zt=zt, zs=zs, student_is_probability=prob, log_p=lp, log_q=lq)  # fmt: skip
        return user_loss_budget(b, self.compute)

    def rows(self, formula: str, clipped: bool) -> tuple[F64, Budget]:
        """Per-row value of a formula (before reduction and scale) and its error budget."""
        key = (formula, clipped)
        if key not in self._rows:
            self._rows[key] = self._compute(formula, clipped)
        return self._rows[key]

    def _compute(self, formula: str, clipped: bool) -> tuple[F64, Budget]:
        ex = self.ex
        if formula == "exact" and not clipped:
            return ex.rows, self._budget(ex.p, ex.q, ex.zt, ex.zs, ex.lp, ex.lq, False)
        if formula in CLIPPABLE:
            lp, lq, zt, zs, _ = formula_logs(formula, ex)
            if formula == "swapped":
                lp, lq, zt, zs = lq, lp, zs, zt
            return self._kl(lp, lq, zt, zs, clipped)
        exact_budget = self.rows("exact", False)[1]
        beta = jsd_beta(formula)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            if beta is not None:
                return self._jsd(beta, exact_budget)
            if formula == "cross-entropy":  # H(p, q) = KL(p‖q) + H(p); NaN rows stay NaN through KL
                rows = ex.rows + np.sum(np.where(ex.p > 0, -ex.p * ex.lp, 0.0), axis=-1)
            elif formula == "probs-input":
                rows = np.sum(POINTWISE(ex.q, ex.p), axis=-1)
            elif formula == "log-target":
                rows = np.sum(POINTWISE(ex.lq, ex.lp), axis=-1)
            elif formula == "log-probs-clipped":
                rows = CLIPPED_ROWS(ex.lp, ex.lq, reduction=None, epsilon=self.eps)
            elif formula == "logits-clipped":
                rows = CLIPPED_ROWS(ex.zt, ex.zs, reduction=None, epsilon=self.eps)
            else:
                raise ValueError(f"unknown formula {formula!r}")
        # each summand of these is bounded by the exact formula's e_j (p|log p|, p|log q|, p q <= p), so
        # its error budget bounds theirs too
        return np.asarray(rows, np.float64), exact_budget

    def _jsd(self, beta: float, exact_budget: Budget) -> tuple[F64, Budget]:
        """β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q, as TRL computes it (log m by logsumexp).

        Its summands are p|log p − log m| and q|log q − log m| with |log m| <= max(|log p|, |log q|):
        the forward KL's budget covers the first, the reverse KL's (``swapped``) the second.
        """
        ex = self.ex
        lm = oracle.log_mixture(ex.lp, ex.lq, beta)
        rows = beta * oracle.kl_from_log_probs(ex.lp, lm) + (1.0 - beta) * oracle.kl_from_log_probs(ex.lq, lm)
        return np.asarray(rows, np.float64), exact_budget.plus(self.rows("swapped", False)[1])


def prepare(obs: Observation, framework: str) -> Prepared:
    """The oracle's quantities of an observation's case, its inputs rounded as the loss saw them."""
    t64, s64 = obs.case.logits()
    t, s = widen(round_to(t64, obs.dtype)), widen(round_to(s64, obs.dtype))
    ex = exact_of(t, s, obs.case.temperature)
    compute = obs.dtype
    if obs.value_dtype in DTYPE_NAMES and dtype_info(obs.value_dtype).unit_roundoff > dtype_info(compute).unit_roundoff:
        compute = obs.value_dtype  # computed in a narrower dtype (Keras: float64 inputs in float32)
    eps = float(round_to(np.asarray(CLIP_EPSILON), compute))
    return Prepared(obs, ex, framework, compute, eps)


@dataclass(frozen=True)
class Prediction:
    """What a hypothesis predicts for one observation: value, tolerance and entries left free."""

    value: F64
    tolerance: F64
    free: NDArray[np.bool_]  #: entries where any finite value is accepted (NaN swallowed)


def predict(h: Hypothesis, prep: Prepared) -> Prediction:
    """The value ``h`` predicts for one observation."""
    rows, bud = prep.rows(h.formula, h.clipped)
    ex = prep.ex
    free_rows = np.zeros(rows.shape, dtype=bool)
    if h.overlay == "masked-nan":
        rows = np.where(np.any((ex.lp == -np.inf) & (ex.lq == -np.inf), axis=-1), np.nan, rows)
    elif h.overlay == "zero-prob-nan":
        rows = np.where(np.any(ex.lp == -np.inf, axis=-1), np.nan, rows)
    elif h.overlay == "nan-swallowed":
        free_rows = np.isnan(ex.rows)
    value, tol = reduce(rows, bud, h.reduction.name, prep.shape)
    scale = ex.temperature**h.power
    free = free_rows if h.reduction.name == "per-token" else np.asarray(free_rows.any())
    return Prediction(np.asarray(value * scale, np.float64), np.asarray(tol * scale, np.float64), free)


def matches(value: F64 | None, pred: Prediction) -> bool:
    """Same shape, same NaN and inf pattern, finite entries within tolerance (free entries: finite)."""
    if value is None or value.shape != pred.value.shape:
        return False
    ref, free = pred.value, pred.free
    nan_o, nan_r = np.isnan(value), np.isnan(ref)
    if np.any(free & ~np.isfinite(value)):
        return False
    fixed = ~free
    if np.any((nan_o != nan_r) & fixed):
        return False
    inf_r = np.isinf(ref) & fixed
    if np.any(value[inf_r] != ref[inf_r]):
        return False
    fin = fixed & ~nan_r & ~inf_r
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.all(np.abs(value[fin] - ref[fin]) <= np.broadcast_to(pred.tolerance, ref.shape)[fin]))


def worst(value: F64 | None, pred: Prediction) -> float:
    """max |error| / tolerance of a value against a prediction (inf when the pattern differs)."""
    if value is None or value.shape != pred.value.shape:
        return math.inf
    ref = pred.value
    if np.any(np.isnan(value) != np.isnan(ref)):
        return math.inf
    fin = np.isfinite(ref)
    if np.any(value[~fin & ~np.isnan(ref)] != ref[~fin & ~np.isnan(ref)]):
        return math.inf
    tol = np.broadcast_to(pred.tolerance, ref.shape)[fin]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        err = np.abs(value[fin] - ref[fin])
        r = np.where(tol > 0, err / tol, np.where(err == 0, 0.0, np.inf))
    return float(np.max(r)) if r.size else 0.0
