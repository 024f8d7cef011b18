"""TRL's ``GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
reduction)`` (on-policy distillation, trl.experimental.gkd): student first; both logits divided by T, no T²;
elementwise ``F.kl_div(..., log_target=True)``: beta 0 is the forward KL(teacher ‖ student), beta 1 the
reverse KL(student ‖ teacher), otherwise the generalized JSD β·KL(teacher ‖ m) + (1 − β)·KL(student ‖ m),
m = β·teacher + (1 − β)·student mixed in log space. No masking: a −inf logit on either side gives
0 · (−inf) = NaN on that class. ``labels`` (−100 = ignored) select the tokens; ``batchmean`` divides the sum
by the number of valid tokens with labels and by ``size(0)`` (B, not B·S) without; ``mean`` by every
element (÷ C too); ``sum``; ``none`` elementwise.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from numpy.typing import NDArray

from klparity.apis.base import ApiSpec, GradModel, underflow_meets_student_inf
from klparity.apis.torch_kl_div import TorchKlDiv
from klparity.apis.torch_kl_div import formula as torch_formula
from klparity.apis.trl_gkd.call import call, call_grad, valid_rows
from klparity.model import Api, Expectation, GradOutput
from klparity.numerics import oracle
from klparity.numerics.errormodel import Budget, GradBudget, budget

if TYPE_CHECKING:
    from klparity.model import Exact

F64 = NDArray[np.float64]

ENTRY = "trl.experimental.gkd.GKDTrainer.generalized_jsd_loss"
#: the labels a cell passes: none, or every token valid but the last row of the flattened row grid
LABELS = ("none", "last-ignored")


def _swapped(ex: Exact) -> Exact:
    """The case with teacher and student exchanged (the reverse KL's quantities)."""
    return replace(ex, teacher=ex.student, student=ex.teacher, zt=ex.zs, zs=ex.zt, lp=ex.lq, lq=ex.lp, p=ex.q,
                   q=ex.p, rows=oracle.kl_from_logits(ex.student, ex.teacher, ex.temperature))  # fmt: skip


def _swapped_output(out: GradOutput) -> GradOutput:
    """A gradient output with the roles exchanged (the reverse KL is torch's kl_div on swapped arguments)."""
    return replace(out, student=out.teacher if out.teacher is not None else out.student, teacher=out.student,
                   seen_target=out.seen_input, seen_input=out.seen_target)  # fmt: skip


def _swapped_budget(b: GradBudget) -> GradBudget:
    return replace(b, student_scale=b.teacher_scale, teacher_scale=b.student_scale,
                   student_size=b.teacher_size, teacher_size=b.student_size,
                   student_terms=b.teacher_terms, teacher_terms=b.student_terms)  # fmt: skip


_TORCH = TorchKlDiv()


def _beta(api: Api) -> float:
    return float(str(api.option("beta")))


def _budget(ex: Exact, framework: str, dtype: str, compute: str) -> Budget:
    return budget(framework=framework, input_dtype=dtype, compute_dtype=compute, p=ex.p, q=ex.q, zt=ex.zt,
                  zs=ex.zs, student_is_probability=False, log_p=ex.lp, log_q=ex.lq)  # fmt: skip


def _exact_terms(lp: F64, p: F64, lm: F64) -> F64:
    with np.errstate(invalid="ignore"):
        return np.asarray(np.where(p == 0, 0.0, p * (lp - lm)), np.float64)


class TrlGkd(ApiSpec):
    """TRL's generalized JSD loss at a beta: see the module docstring."""

    semantics = "trl_gkd"
    default_reduction = "batchmean"
    none_is_elementwise = True
    facts = "klparity.apis.trl_gkd.facts"
    mutants = "klparity.apis.trl_gkd.mutants"
    conventions = "klparity.apis.trl_gkd.conventions"
    differences: ClassVar[dict[str, str]] = {
        "trl.masked_class_nan": "generalized_jsd_loss computes F.kl_div(..., log_target=True) = exp(t) · (t − x) "
        "with no masking: a class with a −inf logit (a masked vocabulary) gives 0 · (−inf) = NaN (beta 0: on a "
        "−inf teacher class; beta 1: on a −inf student class; between: on either); the exact value is finite",
        "trl.underflow_times_inf_nan": "beta 0 (1): a teacher (student) probability that underflows to 0 in the "
        "tested dtype on a class where the other side is −inf gives 0 · inf = NaN; the exact KL is +inf",
    }

    def entries(self, framework: str, dtype: str) -> tuple[Api, ...]:
        """Four calls on torch: beta 0, 1 and an asymmetric 0.5 without labels, beta 0 with the last row ignored."""
        if framework != "torch":
            return ()
        return tuple(
            Api("torch", ENTRY, "trl_gkd", ("batchmean", "sum", "mean", "none", "default"),
                (("beta", beta), ("labels", labels)), requires=("trl", "trl"), call=call, call_grad=call_grad)
            for beta, labels in ((0.0, "none"), (1.0, "none"), (0.5, "none"), (0.0, "last-ignored"))
        )  # fmt: skip

    def _terms(self, api: Api, ex: Exact, dtype: str, compute: str,
               framework: str) -> tuple[F64, F64, Budget, NDArray[np.bool_]]:  # fmt: skip
        """(elementwise value, elementwise exact value, budget, entries where NaN is accepted too)."""
        beta = float(str(api.option("beta")))
        if beta in (0.0, 1.0):
            side = ex if beta == 0.0 else _swapped(ex)
            flushed, maybe = underflow_meets_student_inf(side, compute)
            value = torch_formula.torch_pointwise(side.lq, np.where(flushed, -np.inf, side.lp), log_target=True)
            exact = _exact_terms(side.lp, side.p, side.lq)
            bud = _budget(side, framework, dtype, compute)
            nan_ok = maybe
        else:
            lm = oracle.log_mixture(ex.lp, ex.lq, beta)
            pointwise = torch_formula.torch_pointwise
            value = beta * pointwise(lm, ex.lp, log_target=True) + (1.0 - beta) * pointwise(
                lm, ex.lq, log_target=True)  # fmt: skip
            exact = beta * _exact_terms(ex.lp, ex.p, lm) + (1.0 - beta) * _exact_terms(ex.lq, ex.q, lm)
            fwd, rev = _budget(ex, framework, dtype, compute), _budget(_swapped(ex), framework, dtype, compute)
            # summands p|log p − log m| and q|log q − log m|, |log m| <= max(|log p|, |log q|): both budgets
            bud = fwd.plus(rev)
            nan_ok = np.zeros(value.shape, dtype=bool)
        nan_rows = np.isnan(ex.rows)[..., None]
        exact = np.where(nan_rows, np.nan, exact)
        return np.asarray(value, np.float64), np.asarray(exact, np.float64), bud, np.asarray(nan_ok)

    def expectations(self, api: Api, ex: Exact, dtype: str, compute: str,
                     framework: str) -> tuple[dict[str, Expectation], Budget]:  # fmt: skip
        value, exact, bud, nan_ok = self._terms(api, ex, dtype, compute, framework)
        c = value.shape[-1]
        labels = api.option("labels")
        keep = valid_rows(value.shape, labels)
        if labels != "none":  # jsd[mask]: the valid tokens as (N_valid, C)
            value = np.asarray(np.reshape(value, (-1, c))[keep], np.float64)
            exact = np.asarray(np.reshape(exact, (-1, c))[keep], np.float64)
            nan_ok = np.asarray(np.reshape(nan_ok, (-1, c))[keep], np.bool_)
            bud = replace(bud, elem_scale=np.reshape(bud.elem_scale, (-1, c))[keep],
                          floor=np.reshape(bud.floor, (-1, c))[keep])  # fmt: skip
        out = {}
        for red in api.reductions:
            r = self.resolve(red)
            if r == "none":
                tol: F64 | float = bud.elementwise()
                v, e, n = value, exact, nan_ok
            else:
                div = {"sum": 1, "mean": value.size, "batchmean": max(value.shape[0], 1)}[r]
                with np.errstate(invalid="ignore", over="ignore"):
                    v, e = np.asarray(np.sum(value) / div), np.asarray(np.sum(exact) / div)
                tol, n = bud.total() / div, np.asarray(nan_ok.any())
            out[red] = Expectation(value=np.asarray(v, np.float64), tolerance=tol, exact=np.asarray(e),
                                   gap_bound=None, dtype=compute, must_warn=None, nan_allowed=n)  # fmt: skip
        return out, bud

    # ---------------------------------------------------------------------------- gradients
    # beta 0 without labels is torch's kl_div(student log q, teacher log p, log_target=True), value and
    # gradient; beta 1 the same with the roles exchanged. The JSD (0 < beta < 1) and the token-masked
    # variants have no gradient model (their gradient cells are not collected).

    def has_gradients(self, api: Api | None = None) -> bool:
        return api is None or (_beta(api) in (0.0, 1.0) and api.option("labels") == "none")

    def grad_model(self, api: Api, ex: Exact, first: GradOutput, dtype: str, compute: str,
                   framework: str) -> GradModel:  # fmt: skip
        as_torch = replace(api, options=(("log_target", True),))
        if _beta(api) == 0.0:
            return _TORCH.grad_model(as_torch, ex, first, dtype, compute, framework)
        m = _TORCH.grad_model(as_torch, _swapped(ex), _swapped_output(first), dtype, compute, framework)

        def pattern(out: GradOutput, scale: float) -> tuple[F64, F64]:
            s, t = m.pattern(_swapped_output(out), scale)
            return t, s

        return GradModel(m.teacher, m.student, m.exact_teacher, m.exact_student, _swapped_budget(m.budget), None,
                         pattern, lambda out: m.differences(_swapped_output(out)))  # fmt: skip

    def grad_divisor(self, reduction: str, shape: tuple[int, ...]) -> int:
        """As torch's kl_div: 'batchmean' ÷ size(0), 'mean' ÷ every element (no labels)."""
        return _TORCH.grad_divisor(self.resolve(reduction), shape)

    def grad_difference_applies(self, api: Api, name: str, wrt: str) -> bool:
        """torch's target-gradient differences: the target is the teacher at beta 0, the student at beta 1."""
        target = "teacher" if _beta(api) == 0.0 else "student"
        return wrt == target or name not in _TORCH.grad_differences

    def known_differences(self, api: Api, ex: Exact, compute: str) -> list[str]:
        beta = float(str(api.option("beta")))
        found = []
        minus_inf = {0.0: ex.lp == -np.inf, 1.0: ex.lq == -np.inf}.get(beta, (ex.lp == -np.inf) | (ex.lq == -np.inf))
        if np.any(minus_inf):
            found.append("trl.masked_class_nan")
        if beta in (0.0, 1.0):
            surely, maybe = underflow_meets_student_inf(ex if beta == 0.0 else _swapped(ex), compute)
            if np.any(surely | maybe):
                found.append("trl.underflow_times_inf_nan")
        return found
