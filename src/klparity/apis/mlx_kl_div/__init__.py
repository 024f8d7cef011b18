"""``mlx.nn.losses.kl_div_loss(inputs, targets, axis=-1, reduction="none")``: log-probabilities on both
sides, the student first, ``sum(exp(targets) * (targets - inputs), axis)`` = KL(teacher ‖ student) per row;
reductions ``none`` (one value per row, the default), ``mean`` (``mx.mean`` over the rows: ÷ B for (B, C),
÷ B·S for (B, S, C); the sum is rounded to the result dtype first) and ``sum``. In exact arithmetic, special
values included, this is torch's ``kl_div(..., log_target=True)`` pointwise formula summed per row, so
``torch_formula.torch_pointwise`` with ``log_target`` models it: NaN on a class whose teacher log-probability is
-inf (0 · (−inf)), +inf where only the student is -inf, NaN propagating. Its documented differences, pinned
facts (``facts``) and mutants (``mutants``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from numpy.typing import NDArray

from klparity.apis.base import ApiSpec, log_space_golden, overflow_masks, underflow_meets_student_inf
from klparity.apis.torch_kl_div import formula as torch_formula
from klparity.model import Api, Expectation, GoldenExpected
from klparity.numerics.errormodel import Budget, budget

if TYPE_CHECKING:
    from klparity.model import Exact
    from klparity.numerics.goldens import Golden

F64 = NDArray[np.float64]


def mlx_exp_flushes(dtype: str) -> bool:
    """MLX's CPU ``exp`` returns 0 below about 0.71 times float32's smallest normal number (measured:
    exp(x) = 0 for x < -87.683 in float32, where the exact value is 8.3e-39), so float32 and bfloat16
    (computed in float32) lose their subnormal range; float16's subnormals are far above that and kept."""
    return dtype != "float16"


def rows_of(ex: Exact, dtype: str) -> tuple[F64, NDArray[np.bool_]]:
    """Per-row value of kl_div_loss on the case (the teacher mass that surely underflows ``dtype`` where
    the student is -inf made 0, so that 0 · inf = NaN there), and the rows where NaN is allowed too (such
    an underflow within rounding error)."""
    flushed, maybe = underflow_meets_student_inf(ex, dtype, flushes=mlx_exp_flushes(dtype))
    pointwise = torch_formula.torch_pointwise(ex.lq, np.where(flushed, -np.inf, ex.lp), log_target=True)
    with np.errstate(invalid="ignore", over="ignore"):
        rows = np.sum(pointwise, axis=-1)
    return np.asarray(rows, np.float64), np.asarray(maybe.any(axis=-1))


class MlxKlDiv(ApiSpec):
    """MLX's ``kl_div_loss``: see the module docstring."""

    semantics = "mlx_kl_div"
    default_reduction = "none"
    facts = "klparity.apis.mlx_kl_div.facts"
    mutants = "klparity.apis.mlx_kl_div.mutants"
    differences: ClassVar[dict[str, str]] = {
        "mlx.masked_class_nan": "mlx.nn.losses.kl_div_loss computes exp(targets) * (targets - inputs) = "
        "0 * (-inf - x) = NaN on a class whose teacher log-probability is -inf (masked in the teacher only, "
        "or in both teacher and student, as in a masked vocabulary); the exact KL gives 0 for that class",
        "mlx.underflow_times_inf_nan": "a teacher probability exp(log p) that underflows to 0 in the tested "
        "dtype (MLX's float32 exp returns 0 below ~0.71 of the smallest normal number), on a class where the "
        "student is -inf, gives 0 * inf = NaN (as in torch); the exact KL is +inf",
    }

    def expectations(self, api: Api, ex: Exact, dtype: str, compute: str,
                     framework: str) -> tuple[dict[str, Expectation], Budget]:  # fmt: skip
        bud = budget(framework=framework, input_dtype=dtype, compute_dtype=compute, p=ex.p, q=ex.q, zt=ex.zt,
                     zs=ex.zs, student_is_probability=False, log_p=ex.lp, log_q=ex.lq)  # fmt: skip
        rows, nan_rows = rows_of(ex, compute)
        out = {}
        for red in api.reductions:
            r = self.resolve(red)
            tol: F64 | float
            if r == "none":
                value, tol, exact, nan_ok = rows, bud.rows(), ex.rows, nan_rows
            else:
                div = self.divisor(r, rows.shape)
                with np.errstate(invalid="ignore", over="ignore"):
                    value = np.asarray(np.sum(rows) / div)
                    exact = np.asarray(np.sum(ex.rows) / div)
                tol, nan_ok = bud.total() / div, np.asarray(nan_rows.any())
            out[red] = Expectation(value=np.asarray(value, np.float64), tolerance=tol, exact=np.asarray(exact),
                                   gap_bound=None, dtype=compute, must_warn=None, nan_allowed=nan_ok)  # fmt: skip
        return out, bud

    def known_differences(self, api: Api, ex: Exact, compute: str) -> list[str]:
        found = []
        if np.any(ex.lp == -np.inf):
            found.append("mlx.masked_class_nan")
        surely, maybe = underflow_meets_student_inf(ex, compute, flushes=mlx_exp_flushes(compute))
        if np.any(surely | maybe):
            found.append("mlx.underflow_times_inf_nan")
        return found

    def adjust(self, expected: dict[str, Expectation]) -> tuple[dict[str, Expectation], bool]:
        """``mx.mean`` is ``mx.sum`` rounded to the result dtype, times 1/n: it overflows to inf with the
        sum (float16: past 65504) even when the mean is representable (judged from the ``'sum'``
        expectation, which the adapter always evaluates beside ``'mean'``)."""
        means = [red for red in expected if self.resolve(red) == "mean"]
        if "sum" not in expected or not means:
            return expected, False
        total = expected["sum"]
        surely, maybe = overflow_masks(total.value, total.tolerance, total.dtype)
        if not (surely.any() or maybe.any()):
            return expected, False
        changed = dict(expected)
        for red in means:
            e = expected[red]
            with np.errstate(invalid="ignore"):
                value = np.where(surely, np.copysign(np.inf, np.asarray(total.value)), e.value)
            allowed = maybe if e.inf_allowed is None else (e.inf_allowed | maybe)
            changed[red] = replace(e, value=value, inf_allowed=allowed)
        return changed, True

    def golden_expected(self, g: Golden, ex: Exact, api: Api, fw: str, compute: str) -> GoldenExpected:
        """torch's log_target formula on log_softmax outputs: NaN rows on zero targets, as documented; 'none'
        is one value per row, compared with the golden's rows (the default ``golden_reductions``)."""
        return log_space_golden(g, ex, True, fw, compute)

    # ---------------------------------------------------------------- reduction consistency

    def reduces_own_output(self) -> bool:
        return True

    def reduce(self, pointwise: F64, reduction: str) -> F64:
        """``'sum'`` / ``'mean'`` of the per-row ``'none'`` output (``mean``: ÷ the number of rows); ``'none'``
        is the output itself (the ``'default'`` label resolves to it)."""
        if reduction == "none":
            return pointwise
        if reduction not in ("sum", "mean"):
            raise ValueError(f"unknown {self.semantics} reduction {reduction!r}; expected none, mean or sum")
        with np.errstate(invalid="ignore", over="ignore"):
            total = np.sum(pointwise)
        return np.asarray(total if reduction == "sum" else total / max(pointwise.size, 1), np.float64)

    def divisor(self, reduction: str, pointwise_shape: tuple[int, ...]) -> int:
        """The number of rows (the size of the per-row output) for ``'mean'``; 1 otherwise."""
        return max(math.prod(pointwise_shape), 1) if reduction == "mean" else 1

    def sum_rounded_first(self, reduction: str) -> bool:
        return reduction in ("sum", "mean")
