"""``keras.losses.KLDivergence`` / ``keras.losses.kl_divergence``: y_true and y_pred clipped to
[epsilon, 1] (epsilon 1e-7, no renormalisation), ``sum(t · log(t / u))`` per row, reductions
``sum_over_batch_size`` (÷ rows, B·S; the default), ``sum``, ``mean``, ``none``; its gradient through the
clip and the softmax op by op; the derived bound on the clipping gap; documented differences, facts
(``facts``) and mutants (``mutants``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from numpy.typing import NDArray

from klparity.apis.base import ApiSpec, GapFigure, GradModel, rounding_band
from klparity.apis.keras_kl_divergence import formula as keras_formula
from klparity.model import Api, Expectation, GoldenExpected, GradOutput
from klparity.numerics.dtypes import dtype_info, round_to, widen
from klparity.numerics.errormodel import Budget, budget, grad_budget
from klparity.numerics.exact_grads import exact_grads, rounded_to, rowsum

if TYPE_CHECKING:
    from klparity.model import Exact
    from klparity.numerics.goldens import Golden

F64 = NDArray[np.float64]


def clip_passes(x: F64, epsilon: float) -> NDArray[np.bool_]:
    """Where ``clip_by_value(x, eps, 1)`` passes the gradient: not (x < eps or x > 1), so also at NaN."""
    with np.errstate(invalid="ignore"):
        return np.asarray(~((x < epsilon) | (x > 1.0)), np.bool_)


def keras_grads(
    y_true: F64,
    y_pred: F64,
    temperature: float,
    *,
    scale: float = 1.0,
    epsilon: float = keras_formula.KERAS_EPSILON,
    mask_true: NDArray[np.bool_] | None = None,
    mask_pred: NDArray[np.bool_] | None = None,
    compute: str | None = None,
    cast_to: str | None = None,
) -> tuple[F64, F64]:
    """Gradients of ``scale * sum(kl_divergence(y_true, y_pred))`` w.r.t. student and teacher logits.

    The clipped formula differentiated by hand, following TF's backward op by op:
    ``t = clip(y_true)``, ``u = clip(y_pred)``, ``r = t / u``, loss ``t log r``; then
    d/dr = scale t / r, d/du = d/dr ((-t / u) / u), d/dt = scale log r + d/dr / u; the clip passes
    the gradient where eps <= x <= 1 and gives 0 elsewhere (``mask_*``, default from the inputs);
    softmax backward (g - sum g y) y, then / T. So with nothing overflowing, d/ds_k =
    scale (q_k S - t_k m_k) / T with m the clip's 0/1 derivative and S = sum_j t_j m_j.
    ``compute`` / ``cast_to``: round each backward op to the compute dtype and the result to the input
    dtype, as TF does, so that overflow to inf happens where it does (None: exact float64). NaN
    follows TF: the clip keeps a NaN and passes its gradient (``clip_passes``), the clip of y_pred
    zeroes it where y_pred < eps, so a NaN teacher class whose student probability is clipped leaves
    the student gradient finite.
    """
    mt = clip_passes(y_true, epsilon) if mask_true is None else mask_true
    mp = clip_passes(y_pred, epsilon) if mask_pred is None else mask_pred
    # the clip's output: the value itself where it passes, else the bound it was cut to (given
    # masks come from the values Keras saw, which may sit on the other side of eps than these)
    t = np.where(mt, y_true, np.where(y_true > 1.0, 1.0, epsilon))
    u = np.where(mp, y_pred, np.where(y_pred > 1.0, 1.0, epsilon))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        c = compute
        r = rounded_to(t / u, c)
        g_r = rounded_to(rounded_to(scale * t, c) * rounded_to(1.0 / r, c), c)
        g_u = rounded_to(g_r * rounded_to(rounded_to(-t / u, c) / u, c), c)
        g_t = rounded_to(rounded_to(scale * rounded_to(np.log(r), c), c) + rounded_to(g_r / u, c), c)
        g_pred = rounded_to(np.where(mp, g_u, 0.0), cast_to)
        g_true = rounded_to(np.where(mt, g_t, 0.0), cast_to)
        g_s = (g_pred - rowsum(g_pred * y_pred)) * y_pred
        g_tt = (g_true - rowsum(g_true * y_true)) * y_true
    return np.asarray(g_s / temperature, np.float64), np.asarray(g_tt / temperature, np.float64)


def keras_clip_grad_gap_bound(p: F64, q: F64, mask_true: NDArray[np.bool_], mask_pred: NDArray[np.bool_],
                              epsilon: float, temperature: float) -> F64:  # fmt: skip
    """Bound on |Keras's clipped d/ds - (q - p)/T| per element (scale 1), by the triangle inequality.

    With t the clipped y_true and m the 0/1 derivative of the clip of y_pred,
    d/ds_k - (q_k - p_k)/T = ((p_k - t_k m_k) - q_k sum_j (p_j - t_j m_j)) / T (sum_j p_j = 1), and
    |p_j - t_j m_j| <= a_j = p_j [y_pred_j clipped] + |p_j - eps| [y_true_j clipped], so the gap is
    at most (a_k + q_k sum_j a_j) / T. Zero when nothing is clipped.
    """
    a = np.where(mask_pred, 0.0, p) + np.where(mask_true, 0.0, np.abs(p - epsilon))
    return np.asarray((a + q * rowsum(a)) / temperature, np.float64)




class KerasKlDivergence(ApiSpec):
    """Keras's ``KLDivergence`` loss (class and function): see the module docstring."""

    gap_figure: ClassVar[GapFigure | None] = GapFigure(
        name="keras-clip-gap", framework="tensorflow",
        caption="Keras's KLDivergence (both distributions clipped to [1e-7, 1], float64 formula on "
        "float32-rounded logits) against the exact KL, batch mean, as the temperature varies.",
        label="Keras (clipped)", title_values="exact (solid) and Keras's clipped value (dashed)",
        title_gap="how far Keras's KLDivergence is below the exact KL", gap_label="(exact − Keras) / exact  [%]",
        value=lambda p, q: (float(keras_formula.keras_kl_divergence(p, q, reduction="sum_over_batch_size"))
                            if np.any((p < keras_formula.KERAS_EPSILON) | (q < keras_formula.KERAS_EPSILON))
                            else None),
    )  # fmt: skip

    semantics = "keras"
    default_reduction = "sum_over_batch_size"
    facts: ClassVar[str | None] = "klparity.apis.keras_kl_divergence.facts"
    mutants = "klparity.apis.keras_kl_divergence.mutants"
    conventions = "klparity.apis.keras_kl_divergence.conventions"
    differences: ClassVar[dict[str, str]] = {
        "keras.clip_epsilon": "Keras clips y_true and y_pred to [1e-7, 1] and does not renormalise: "
        "every class with p or q below 1e-7 changes the value",
        "keras.float16_ratio_overflow": "computing in float16 (keras.losses.kl_divergence on float16 "
        "inputs, or dtype='float16'), y_true / y_pred overflows to inf once it exceeds 65504, which "
        "clipping y_pred to 1e-7 makes easy: the loss is inf where the exact KL is finite",
    }
    grad_differences: ClassVar[dict[str, str]] = {
        "keras.clip_epsilon_gradient": "Keras clips y_pred (and y_true) to [1e-7, 1]; the clip's "
        "derivative is 0 outside, so a class with q < 1e-7 gets no gradient and the other classes are "
        "weighted by the clipped, unnormalised y_true: the gradient differs from (q - p)/T",
        "keras.nan_teacher_hidden_by_clip": "a NaN teacher logit gives NaN y_true (TF's float32 softmax: at that "
        "class only, 0 elsewhere), but where the student's probability at a NaN class is below 1e-7 the clip's "
        "gradient is where(y_pred < eps, 0, g), which replaces the NaN by 0: the student gradient of that row is "
        "finite (the loss itself is NaN) where the exact gradient is NaN",
        "keras.float16_gradient_overflow": "in float16, TF's division gradient (-y_true / y_pred) / y_pred "
        "(kl_divergence on float16 inputs), or the float32 gradient -y_true / y_pred cast back to float16 "
        "(KLDivergence), exceeds 65504: the gradient row is inf/NaN where the exact one is finite",
    }

    def expectations(self, api: Api, ex: Exact, dtype: str, compute: str,
                     framework: str) -> tuple[dict[str, Expectation], Budget]:  # fmt: skip
        eps = float(round_to(np.asarray(keras_formula.KERAS_EPSILON), compute))
        cmax = dtype_info(compute).max
        pt, qt = np.clip(ex.p, eps, 1.0), np.clip(ex.q, eps, 1.0)
        bud = budget(framework=framework, input_dtype=dtype, compute_dtype=compute, p=pt, q=qt,
                     zt=ex.zt, zs=ex.zs, student_is_probability=True)  # fmt: skip
        gap_rows = keras_formula.keras_clip_gap_bound(ex.p, ex.q, epsilon=eps)
        # y_true / y_pred overflows the compute dtype past max * (1 + u) (the rounding boundary); the
        # ratio carries the relative error of both softmaxes (band), so near the boundary either is right
        boundary = cmax * (1.0 + dtype_info(compute).unit_roundoff)
        band = np.minimum(0.5, 2.0 * rounding_band(ex, dtype) + 4.0 * dtype_info(compute).unit_roundoff)
        with np.errstate(invalid="ignore", over="ignore"):
            ratio = pt / qt
            surely = ratio * (1.0 - band) >= boundary
            maybe_rows = np.any(~surely & (ratio * (1.0 + band) >= boundary), axis=-1)
        cmax_eff = np.where(surely, 0.0, np.inf)  # oracle: ratio > compute_max becomes inf
        gap_rows = np.where(np.any(surely, axis=-1) | maybe_rows, np.inf, gap_rows)
        out = {}
        for red in api.reductions:
            r = self.resolve(red)
            nrows = max(ex.rows.size, 1)
            tol_rows = bud.rows()
            if r == "none" or ex.rows.ndim == 0:
                tol: F64 | float = tol_rows
                gap: F64 | float = gap_rows
            else:
                div = 1 if r == "sum" else nrows
                tol, gap = float(bud.total()) / div, float(np.sum(gap_rows)) / div
            out[red] = Expectation(
                value=keras_formula.keras_kl_divergence(ex.p, ex.q, reduction=r, epsilon=eps, compute_max=cmax_eff),
                tolerance=tol,
                exact=keras_formula.keras_reduce(ex.rows, r),
                gap_bound=gap,
                dtype=compute,
                must_warn=None,
                inf_allowed=maybe_rows if (r == "none" or ex.rows.ndim == 0) else np.asarray(maybe_rows.any()),
            )
        return out, bud

    def known_differences(self, api: Api, ex: Exact, compute: str) -> list[str]:
        found = []
        if compute == "float16":
            eps = float(round_to(np.asarray(keras_formula.KERAS_EPSILON), compute))
            with np.errstate(invalid="ignore"):
                ratio = np.clip(ex.p, eps, 1.0) / np.clip(ex.q, eps, 1.0)
            if np.any(ratio * 1.5 > dtype_info(compute).max):  # overflowing, or within the rounding band
                found.append("keras.float16_ratio_overflow")
        if np.any((ex.p < keras_formula.KERAS_EPSILON) | (ex.q < keras_formula.KERAS_EPSILON)):
            found.append("keras.clip_epsilon")
        return found

    def reduces_own_output(self) -> bool:
        return True

    def reduce(self, pointwise: F64, reduction: str) -> F64:
        return keras_formula.keras_reduce(pointwise, reduction)

    def grad_model(self, api: Api, ex: Exact, first: GradOutput, dtype: str, compute: str,
                   framework: str) -> GradModel:  # fmt: skip
        eps = float(round_to(np.asarray(keras_formula.KERAS_EPSILON), compute))
        seen_t, seen_q = widen(round_to(first.seen_target, compute)), widen(round_to(first.seen_input, compute))
        mt, mp = clip_passes(seen_t, eps), clip_passes(seen_q, eps)
        g_s, g_t = keras_grads(ex.p, ex.q, ex.temperature, epsilon=eps, mask_true=mt, mask_pred=mp)
        t, u = np.where(mt, ex.p, eps), np.where(mp, ex.q, eps)  # the clipped values (see keras_grads)
        with np.errstate(divide="ignore", invalid="ignore"):
            h = np.where(mt, np.log(t / u) + 1.0, 0.0)
        bud = grad_budget(framework=framework, input_dtype=dtype, compute_dtype=compute,
                          temperature=ex.temperature, weight=np.where(mp, t, 0.0), p=ex.p, q=ex.q, h=h,
                          zt=ex.zt, zs=ex.zs, log_p=ex.lp, log_q=ex.lq,
                          student_is_probability=True)  # fmt: skip
        cast_to = dtype if dtype != compute else None  # KLDivergence casts to its dtype and back
        exact_s, exact_t = exact_grads(ex)

        def pattern(out: GradOutput, scale: float) -> tuple[F64, F64]:
            return keras_grads(seen_t, seen_q, ex.temperature, scale=float(round_to(np.asarray(scale), compute)),
                               epsilon=eps, mask_true=mt, mask_pred=mp, compute=compute, cast_to=cast_to)  # fmt: skip

        def differences(out: GradOutput) -> list[str]:
            found = []
            if not (mt.all() and mp.all()) or np.any(ex.p < eps) or np.any(ex.q < eps):
                found.append("keras.clip_epsilon_gradient")
            s, t = pattern(out, 1.0)
            exact_ok = np.isfinite(exact_s) & np.isfinite(exact_t)
            if np.any(~np.isfinite(s) & exact_ok) or np.any(~np.isfinite(t) & exact_ok):
                found.append("keras.float16_gradient_overflow")
            if np.any(np.isfinite(s) & np.isnan(exact_s)):
                found.append("keras.nan_teacher_hidden_by_clip")
            return found

        gap = keras_clip_grad_gap_bound(ex.p, ex.q, mt, mp, eps, ex.temperature)
        return GradModel(g_s, g_t, exact_s, exact_t, bud, gap, pattern, differences)

    def grad_divisor(self, reduction: str, shape: tuple[int, ...]) -> int:
        rows = math.prod(shape[:-1])
        by_rows = rows if len(shape) > 1 else 1  # a 1-D input gives a scalar, never reduced
        table = {"none": 1, "sum": 1, "sum_over_batch_size": by_rows, "mean": by_rows,
                 "mean_with_sample_weight": by_rows}  # fmt: skip
        r = self.resolve(reduction)
        if r not in table:
            raise ValueError(f"unknown {self.semantics} reduction {reduction!r}")
        return table[r]


    def golden_expected(self, g: Golden, ex: Exact, api: Api, fw: str, compute: str) -> GoldenExpected:
        """Golden rows where clipping and float16 overflow are inactive, the clipped formula elsewhere."""
        eps = float(round_to(np.asarray(keras_formula.KERAS_EPSILON), compute))
        cmax = dtype_info(compute).max
        pt, qt = np.clip(ex.p, eps, 1.0), np.clip(ex.q, eps, 1.0)
        with np.errstate(invalid="ignore"):
            overflow = (pt / qt > cmax).any(axis=-1)
        clipped = ((ex.p < eps) | (ex.q < eps)).any(axis=-1) | overflow
        formula = keras_formula.keras_kl_divergence(ex.p, ex.q, reduction="none", epsilon=eps, compute_max=cmax)
        rows = np.where(clipped & ~np.isnan(g.kl), formula, g.kl)
        bud = budget(framework=fw, input_dtype=g.dtype, compute_dtype=compute, p=pt, q=qt,
                                zt=ex.zt, zs=ex.zs, student_is_probability=True)  # fmt: skip
        total = g.kl_sum if not clipped.any() else math.fsum(np.ravel(rows))
        notes, problems = [], []
        if clipped.any():
            sel = clipped & np.isfinite(g.kl) & ~overflow
            with np.errstate(invalid="ignore"):
                gap = np.abs(formula - g.kl)[sel]
            bound = keras_formula.keras_clip_gap_bound(ex.p, ex.q, epsilon=eps)[sel]
            over = ~(gap <= bound + bud.rows()[sel])  # NaN counts as over
            if over.any():
                problems.append(f"the clipped formula is {float(np.max(gap[over])):.3g} from the golden, "
                                f"beyond the derived clipping bound {float(np.max(bound[over])):.3g}")  # fmt: skip
            largest = float(np.max(gap, initial=0.0))
            notes.append(f"{int(clipped.sum())} of {clipped.size} rows clipped (or float16 overflow): judged "
                         f"against the clipped formula, largest gap to the golden {largest:.3g}")  # fmt: skip
        return GoldenExpected(rows, bud.rows(), total, bud.total(), notes, problems)

    def golden_reductions(self, api: Api, shape: tuple[int, ...]) -> dict[str, tuple[Callable[[F64], F64] | None, int]]:
        """'none' per row, and 'sum_over_batch_size' (÷ rows) where the API has it on a batch."""
        if "sum_over_batch_size" in api.reductions and len(shape) > 1:
            return {"none": (lambda v: v, 1), "sum_over_batch_size": (None, max(math.prod(shape[:-1]), 1))}
        return super().golden_reductions(api, shape)

    def scale_divisor(self, reduction: str, shape: tuple[int, ...]) -> tuple[str, int]:
        name = self.resolve(reduction)
        rows = math.prod(shape[:-1])
        table = {"sum": 1, "sum_over_batch_size": rows, "mean": rows, "mean_with_sample_weight": rows}
        if name not in table:
            raise ValueError(f"reduction {reduction!r} is not checked at scale; expected one of {sorted(table)}")
        return name, table[name]
