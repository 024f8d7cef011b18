"""torchmetrics' ``KLDivergence`` / ``functional.kl_divergence(p, q, log_prob, reduction)``: KL(p ‖ q) with
p first (the teacher), on (N, C) only (a (B, S, C) batch is reshaped to (B·S, C) by the caller, as the
cells do), reductions ``mean`` (÷ N rows, the default), ``sum``, ``none``; no temperature, no T². From
probabilities it renormalises them and takes ``p · log(p / q)`` with the p == 0 terms set to 0 and no
clamp: +inf where the student's probability underflows in the dtype (or p / q overflows), the term
dropped where the teacher's does. With ``log_prob=True`` it is ``exp(lp) · (lp − lq)``: NaN on a masked
teacher class (0 · (−inf)), as torch's ``log_target``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
from numpy.typing import NDArray

from klparity.apis.base import (
    ApiSpec,
    probability_space_differences,
    probability_space_rows,
    underflow_meets_student_inf,
)
from klparity.apis.torch_kl_div import formula as torch_formula
from klparity.model import Api, Expectation
from klparity.numerics.errormodel import Budget, budget

if TYPE_CHECKING:
    from klparity.model import Exact

F64 = NDArray[np.float64]

FUNCTION = "torchmetrics.functional.kl_divergence"


class TorchmetricsKl(ApiSpec):
    """torchmetrics' KL divergence (functional): see the module docstring."""

    semantics = "torchmetrics"
    default_reduction = "mean"
    facts = "klparity.apis.torchmetrics_kl.facts"
    mutants = "klparity.apis.torchmetrics_kl.mutants"
    differences: ClassVar[dict[str, str]] = {
        "torchmetrics.student_underflow_inf": "torchmetrics' kl_divergence computes p · log(p / q) on probabilities: "
        "where the student's probability underflows to 0 in the tested dtype (or p / q overflows), the row is "
        "+inf although the exact KL is finite",
        "torchmetrics.teacher_underflow_hides_inf": "the p == 0 terms are set to 0 (its _safe_xlogy): where the "
        "teacher's mass underflows on a class the student masks (-inf), the row is finite where the exact KL "
        "is +inf",
        "torchmetrics.log_prob_zero_target_nan": "with log_prob=True torchmetrics computes exp(lp) · (lp − lq) = "
        "0 · (−inf) = NaN where the teacher's log-probability is −inf; the exact KL gives 0 there",
        "torchmetrics.underflow_times_inf_nan": "with log_prob=True, a teacher probability that underflows to 0 "
        "in the tested dtype on a class where the student is −inf gives 0 · inf = NaN; the exact KL is +inf",
    }

    def expectations(self, api: Api, ex: Exact, dtype: str, compute: str,
                     framework: str) -> tuple[dict[str, Expectation], Budget]:  # fmt: skip
        log_prob = bool(api.option("log_prob", False))
        bud = budget(framework=framework, input_dtype=dtype, compute_dtype=compute, p=ex.p, q=ex.q, zt=ex.zt,
                     zs=ex.zs, student_is_probability=not log_prob, log_p=ex.lp, log_q=ex.lq)  # fmt: skip
        inf_rows: NDArray[np.bool_] | None = None
        nan_rows: NDArray[np.bool_] | None = None
        if log_prob:
            flushed, maybe = underflow_meets_student_inf(ex, compute)
            pointwise = torch_formula.torch_pointwise(ex.lq, np.where(flushed, -np.inf, ex.lp), log_target=True)
            rows = np.asarray(np.sum(pointwise, axis=-1), np.float64)
            nan_rows = np.asarray(maybe.any(axis=-1))
        else:
            rows, inf_rows = probability_space_rows(ex, framework, compute)
        n = max(rows.size, 1)
        out = {}
        for red in api.reductions:
            r = self.resolve(red)
            div = 1 if r == "sum" else n
            tol: F64 | float
            if r == "none":
                value, tol, exact = rows, bud.rows(), ex.rows
                inf_ok, nan_ok = inf_rows, nan_rows
            else:
                with np.errstate(invalid="ignore"):
                    value, exact = np.asarray(np.sum(rows) / div), np.asarray(np.sum(ex.rows) / div)
                tol = bud.total() / div
                inf_ok = None if inf_rows is None else np.asarray(inf_rows.any())
                nan_ok = None if nan_rows is None else np.asarray(nan_rows.any())
            out[red] = Expectation(value=np.asarray(value, np.float64), tolerance=tol, exact=np.asarray(exact),
                                   gap_bound=None, dtype=compute, must_warn=None, inf_allowed=inf_ok,
                                   nan_allowed=nan_ok)  # fmt: skip
        return out, bud

    def known_differences(self, api: Api, ex: Exact, compute: str) -> list[str]:
        if not api.option("log_prob", False):
            return probability_space_differences(ex, api.framework, compute, "torchmetrics")
        found = []
        if np.any(ex.lp == -np.inf):
            found.append("torchmetrics.log_prob_zero_target_nan")
        surely, maybe = underflow_meets_student_inf(ex, compute)
        if np.any(surely | maybe):
            found.append("torchmetrics.underflow_times_inf_nan")
        return found
