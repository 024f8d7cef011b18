"""Gradient parity: d(KL loss)/d(logits) of each framework API against float64 references.

References, NumPy float64 only:

* the exact gradient of KL(p || q), p = softmax(t/T), q = softmax(s/T), per row:
  d/ds_k = (q_k - p_k) / T and d/dt_k = p_k (log p_k - log q_k - KL) / T (the latter from
  dKL/dp_j = log p_j - log q_j + 1 and dp_j/dt_k = p_j (delta_jk - p_k) / T; the +1 cancels because
  sum_j p_j = 1), times the reduction's scale;
* each API's formula differentiated by hand, following its backward pass op by op (``torch_grads``,
  ``keras_grads``), quirks included: torch's xlogy backward is 0/0 = NaN at a zero target, Keras's
  clip has a 0/1 derivative so classes with q < epsilon get no gradient, and in float16 Keras's
  division gradient ``(-y_true / y_pred) / y_pred`` overflows.

The formula's discrete decisions (which target is exactly 0, which probability the clip cuts,
what overflows) are taken on the values the API received (``GradOutput.seen_*``), where they are
exact; the values it should return are computed from the exact float64 probabilities. As in the
forward checks, each gradient is judged twice: against the API's formula within the tolerance of
``tolerances.grad_budget``, then the formula against the exact gradient, where every difference must
be one of ``GRAD_DIFFERENCES`` (its size is recorded).

Repro of one cell: ``python -m klparity.gradients --framework ... --api ... --case ...`` (see ``main``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from klparity import grid, oracle
from klparity.cases import case_by_id
from klparity.checks import TORCH_MEAN_WARNING, Cell, CheckResult, Exact, case_exact, compare, rounded
from klparity.dtypes import DTYPE_NAMES, round_to, widen
from klparity.frameworks import DEVICES, LAYOUTS, REGISTRY, Adapter, Api
from klparity.frameworks.base import GradOutput
from klparity.tolerances import GradBudget, grad_budget, same_sum

F64 = NDArray[np.float64]

#: Gradient cells of the quick tier use these dtypes; the full tier uses every dtype.
QUICK_GRAD_DTYPES: Final = ("float32", "float64")
#: Entry points left to the full tier's gradient cells: ``nn.KLDivLoss.forward`` calls
#: ``F.kl_div``, so the quick tier differentiates the function only.
FULL_TIER_ONLY_GRAD_ENTRIES: Final = ("torch.nn.KLDivLoss",)
#: API semantics whose gradients this module can judge.
GRAD_SEMANTICS: Final = ("torch", "keras")

#: Documented differences between an API's gradient and the exact gradient (name -> what and why).
GRAD_DIFFERENCES: Final[dict[str, str]] = {
    "torch.target_grad_nan_at_zero_target": "with log_target=False, d kl_div / d target is "
    "xlogy's backward log(t) + t/t = NaN (0/0) where the target is exactly 0 (a -inf teacher logit, "
    "or a probability that underflows the dtype); the softmax backward spreads it over the row. "
    "The exact gradient w.r.t. the teacher logits is finite",
    "torch.log_target_grad_nan_at_neg_inf": "with log_target=True, d/d target of exp(t) (t - input) "
    "is exp(t) (t - input + 1) = 0 * (-inf) = NaN where the log-target is -inf; the log_softmax "
    "backward spreads it over the row. The exact gradient is finite",
    "torch.log_target_grad_underflow_nan": "with log_target=True in float16 / bfloat16, kl_div's backward "
    "computes exp(log-target) in that dtype, where it underflows to 0 (below about -17.3 in float16); where "
    "the student is -inf, (log-target - input) is +inf and 0 * inf makes the whole row NaN. The exact "
    "gradient there is +-inf (the KL is infinite), not NaN",
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


def _exact_grads(ex: Exact) -> tuple[F64, F64]:
    """``exact_student_grad`` and ``exact_teacher_grad`` of a case, from its log-probabilities (the
    KL from ``oracle.kl_from_logits`` whichever oracle made ``ex.rows``)."""
    kl = oracle.kl_from_logits(ex.teacher, ex.student, ex.temperature)
    return _student_grad(ex.lp, ex.lq, ex.temperature), _teacher_grad(ex.lp, ex.lq, kl, ex.temperature)


# --------------------------------------------------------------------------- API formulas


def _rowsum(x: F64) -> F64:
    return np.asarray(np.sum(x, axis=-1, keepdims=True), np.float64)


def _exp(x: F64, dtype: str | None) -> F64:
    """exp(x), rounded to ``dtype`` (so that it underflows to 0 where the framework's does)."""
    with np.errstate(over="ignore"):
        e = np.exp(x)
    return e if dtype is None else widen(round_to(e, dtype))


def torch_grads(
    target: F64, inp: F64, temperature: float, *, log_target: bool, dtype: str | None = None
) -> tuple[F64, F64]:
    """Gradients of ``sum(kl_div(inp, target))`` w.r.t. the student and teacher logits, in float64.

    Follows torch's backward op by op, IEEE specials included: ``inp = log_softmax(s/T)`` (backward
    g - exp(inp) sum g), ``target = softmax(t/T)`` (backward target (g - sum g target)) or
    ``log_softmax(t/T)`` with ``log_target``; kl_div's pointwise backward is -target for the input
    and xlogy's log(t) + t/t - input (NaN at t = 0) for the target, or -exp(t) and
    exp(t) (t - input) + exp(t) with ``log_target``. ``dtype``: round each exp as torch does, so that
    0 * inf = NaN appears where it does: kl_div's backward computes exp(target) in the tensor's dtype,
    log_softmax's backward computes exp(output) in float32 for float16 / bfloat16 tensors.
    """
    acc = ("float32" if dtype in ("float16", "bfloat16") else dtype) if dtype else None
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if log_target:
            e = _exp(target, dtype)
            g_in = -e
            g_tgt = e * (target - inp) + e
            g_t = g_tgt - _exp(target, acc) * _rowsum(g_tgt)
        else:
            g_in = -target
            g_tgt = np.where(target == 0, np.nan, np.log(target) + 1.0) - inp
            g_t = target * (g_tgt - _rowsum(g_tgt * target))
        g_s = g_in - _exp(inp, acc) * _rowsum(g_in)
    return np.asarray(g_s / temperature, np.float64), np.asarray(g_t / temperature, np.float64)


def _rounded(x: F64, dtype: str | None) -> F64:
    """``x`` rounded to ``dtype`` (to nearest; beyond its range to +-inf), widened back; None: as is."""
    if dtype is None or dtype == "float64":
        return x
    with np.errstate(over="ignore", invalid="ignore"):
        return widen(round_to(x, dtype))


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
    epsilon: float = oracle.KERAS_EPSILON,
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
        r = _rounded(t / u, c)
        g_r = _rounded(_rounded(scale * t, c) * _rounded(1.0 / r, c), c)
        g_u = _rounded(g_r * _rounded(_rounded(-t / u, c) / u, c), c)
        g_t = _rounded(_rounded(scale * _rounded(np.log(r), c), c) + _rounded(g_r / u, c), c)
        g_pred = _rounded(np.where(mp, g_u, 0.0), cast_to)
        g_true = _rounded(np.where(mt, g_t, 0.0), cast_to)
        g_s = (g_pred - _rowsum(g_pred * y_pred)) * y_pred
        g_tt = (g_true - _rowsum(g_true * y_true)) * y_true
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
    return np.asarray((a + q * _rowsum(a)) / temperature, np.float64)


def grad_scale(semantics: str, reduction: str, shape: tuple[int, ...]) -> float:
    """Factor a reduction applies to the gradient of the summed loss ('none' differentiates the sum)."""
    numel, rows = math.prod(shape), math.prod(shape[:-1])
    if semantics == "torch":
        r = "mean" if reduction == "default" else reduction
        table = {"none": 1, "sum": 1, "mean": numel, "batchmean": shape[0]}
    elif semantics == "keras":
        r = "sum_over_batch_size" if reduction == "default" else reduction
        by_rows = rows if len(shape) > 1 else 1  # a 1-D input gives a scalar, never reduced
        table = {"none": 1, "sum": 1, "sum_over_batch_size": by_rows, "mean": by_rows,
                 "mean_with_sample_weight": by_rows}  # fmt: skip
    else:
        raise ValueError(f"no gradient semantics for {semantics!r}; expected one of {GRAD_SEMANTICS}")
    if r not in table:
        raise ValueError(f"unknown {semantics} reduction {reduction!r}")
    return 1.0 / table[r]


# -------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class GradModel:
    """What one cell's gradients must be: values at scale 1 and the pattern for a given output."""

    student: F64  #: formula value from the exact probabilities, scale 1
    teacher: F64
    exact_student: F64  #: exact gradient, scale 1
    exact_teacher: F64
    budget: GradBudget
    gap_bound: F64 | None  #: bound on |formula - exact| of d/ds (Keras), scale 1
    pattern: Callable[[GradOutput, float], tuple[F64, F64]]  #: formula on the seen values
    differences: Callable[[GradOutput], list[str]]


def _torch_model(api: Api, ex: Exact, dtype: str, compute: str, framework: str) -> GradModel:
    log_target = bool(api.option("log_target", False))
    tgt = ex.lp if log_target else ex.p
    g_s, g_t = torch_grads(tgt, ex.lq, ex.temperature, log_target=log_target)
    with np.errstate(invalid="ignore", over="ignore"):
        h = np.where(ex.p > 0, ex.lp + 1.0 - ex.lq, 0.0)
    bud = grad_budget(framework=framework, input_dtype=dtype, compute_dtype=compute,
                      temperature=ex.temperature, weight=ex.p, p=ex.p, q=ex.q, h=h, zt=ex.zt, zs=ex.zs,
                      log_p=ex.lp, log_q=ex.lq, student_is_probability=False)  # fmt: skip

    def pattern(out: GradOutput, scale: float) -> tuple[F64, F64]:
        s, t = torch_grads(out.seen_target, out.seen_input, ex.temperature, log_target=log_target, dtype=dtype)
        return scale * s, scale * t

    def differences(out: GradOutput) -> list[str]:
        found = []
        if log_target and np.any(out.seen_target == -np.inf):
            found.append("torch.log_target_grad_nan_at_neg_inf")
        if log_target and np.any(out.seen_input == -np.inf) and np.any(_exp(out.seen_target, dtype) == 0):
            found.append("torch.log_target_grad_underflow_nan")
        if not log_target and np.any(out.seen_target == 0):
            found.append("torch.target_grad_nan_at_zero_target")
        return found

    return GradModel(g_s, g_t, *_exact_grads(ex), bud, None, pattern, differences)


def _keras_model(api: Api, ex: Exact, out0: GradOutput, dtype: str, compute: str, framework: str) -> GradModel:
    eps = float(round_to(np.asarray(oracle.KERAS_EPSILON), compute))
    seen_t, seen_q = widen(round_to(out0.seen_target, compute)), widen(round_to(out0.seen_input, compute))
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
    exact_s, exact_t = _exact_grads(ex)

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


# ------------------------------------------------------------------------------------ driver


def supports_gradients(adapter: Adapter) -> bool:
    """The adapter implements ``run_grad`` (checked without importing its framework)."""
    return type(adapter).run_grad is not Adapter.run_grad


def grad_cells(sel: grid.Selection) -> list[Cell]:
    """Gradient cells of a selection: the forward grid; in the quick tier float32/float64 only and
    ``FULL_TIER_ONLY_GRAD_ENTRIES`` left out."""
    dtypes = sel.dtypes if sel.tier == "full" else tuple(d for d in sel.dtypes if d in QUICK_GRAD_DTYPES)
    frameworks = tuple(f for f in sel.frameworks if supports_gradients(REGISTRY[f]))
    sub = dataclasses.replace(sel, dtypes=dtypes, frameworks=frameworks)
    return [
        c for c in grid.cells(sub)
        if c.api.semantics in GRAD_SEMANTICS and (sel.tier == "full" or c.api.entry not in FULL_TIER_ONLY_GRAD_ENTRIES)
    ]  # fmt: skip


def grad_repro(cell: Cell, shift: int) -> str:
    """One-line command reproducing a gradient cell outside pytest."""
    return (
        f"python -m klparity.gradients --framework {cell.framework} --api '{cell.api.id}' --case "
        f"{cell.case.id} --dtype {cell.dtype} --device {cell.device} --layout {cell.layout} --seed {shift}"
    )


def _judge_meaning(res: CheckResult, ref: F64, exact: F64, tol: F64, known: list[str],
                   bound: F64 | None) -> None:  # fmt: skip
    with np.errstate(invalid="ignore"):
        gap = np.abs(ref - exact)
    same_nan = np.isnan(ref) == np.isnan(exact)
    close = same_nan & (np.isnan(exact) | (np.isinf(exact) & (ref == exact)) | (gap <= tol))
    if bool(np.all(close)):
        return
    finite = gap[np.isfinite(gap)]
    res.exact_gap = float(np.max(finite)) if finite.size else math.inf
    if not known:
        res.fail(f"the API's gradient formula differs from the exact gradient (gap {res.exact_gap:.3g}) "
                 "with no documented difference to explain it: a model bug or an undocumented quirk")  # fmt: skip
        return
    largest = np.abs(exact[np.isfinite(exact)])
    share = res.exact_gap / float(np.max(largest)) if largest.size and np.max(largest) > 0 else math.inf
    rows = int(np.sum(np.any(~close, axis=-1))) if ref.ndim > 1 else int(not np.all(close))
    res.differences = [f"{name}: {GRAD_DIFFERENCES[name]} (gap here {res.exact_gap:.3g} = {share:.3g} of the "
                       f"largest exact gradient component; {rows} row(s) differ)" for name in known]  # fmt: skip
    if bound is not None:
        slack = same_sum("float64", ref.shape[-1], 1.0)  # the bound and the gap are float64 sums too
        with np.errstate(invalid="ignore"):
            over = same_nan & np.isfinite(exact) & np.isfinite(ref) & (gap > bound + tol + slack * (bound + gap))
        if over.any():
            res.fail(f"gap to the exact gradient {float(np.max(gap[over])):.3g} exceeds the derived "
                     f"clipping bound {float(np.max(bound[over])):.3g}")  # fmt: skip


def run_grad_cell(adapter: Adapter, cell: Cell, shift: int = 0,
                  call: Callable[..., dict[str, GradOutput]] | None = None) -> list[CheckResult]:  # fmt: skip
    """Run one gradient cell: per reduction, judge d/d student and d/d teacher (two results each).

    ``call`` replaces ``adapter.run_grad`` (for tests).
    """
    case, dtype, api = cell.case, cell.dtype, cell.api
    t_r, s_r = rounded(case, shift, dtype)
    ex = case_exact(case, shift, dtype)
    compute = adapter.compute_dtype(api, dtype)
    outputs = (call or adapter.run_grad)(api, t_r, s_r, case.temperature, cell.device, cell.layout)
    first = outputs[api.reductions[0]]
    if api.semantics == "torch":
        model = _torch_model(api, ex, dtype, compute, cell.framework)
    elif api.semantics == "keras":
        model = _keras_model(api, ex, first, dtype, compute, cell.framework)
    else:
        raise ValueError(f"no gradient model for {api.semantics!r} APIs ({api.id})")
    results = []
    known = model.differences(first)  # the same inputs reach every reduction
    patterns: dict[float, tuple[F64, F64]] = {}
    for red in api.reductions:
        out = outputs[red]
        scale = grad_scale(api.semantics, red, case.shape)
        if scale not in patterns:
            patterns[scale] = model.pattern(out, scale)
        pat_s, pat_t = patterns[scale]
        for wrt, obs, value, pat, exact, tol, bound in (
            ("student", out.student, model.student, pat_s, model.exact_student, model.budget.student(scale),
             model.gap_bound),
            ("teacher", out.teacher, model.teacher, pat_t, model.exact_teacher, model.budget.teacher(scale), None),
        ):  # fmt: skip
            res = CheckResult(cell.framework, f"d/d{wrt} {api.id}", red, dtype, cell.device, cell.layout,
                              case.id, case.seed(shift), reason=model.budget.reason)  # fmt: skip
            with np.errstate(invalid="ignore", over="ignore"):
                ref = np.where(np.isfinite(pat), scale * value, pat)
            # the formula on the seen values is finite where the exact inputs hold a NaN (Keras's clip
            # zeroes a NaN's gradient): there only finiteness is judged, the values mean nothing
            free = np.isfinite(pat) & np.isnan(value)
            if obs is not None and free.any():
                ref = np.where(free & np.isfinite(obs), obs, ref)
            if obs is None:
                res.fail(f"the API returned no gradient w.r.t. the {wrt} logits (gradients stopped)")
            else:
                compare(res, obs, ref, tol)
            if out.dtype != dtype:
                res.fail(f"gradient dtype {out.dtype}, expected {dtype} (the logits' dtype)")
            must_warn = api.semantics == "torch" and red in ("mean", "default")
            if must_warn and not any(TORCH_MEAN_WARNING in w for w in out.warnings):
                res.fail(f"expected torch's UserWarning containing {TORCH_MEAN_WARNING!r}; none was raised")
            if not must_warn and out.warnings:
                res.fail(f"unexpected warning: {out.warnings[0]}")
            relevant = [k for k in known if wrt == "teacher" or not k.startswith("torch.")]
            _judge_meaning(res, ref, scale * exact, tol, relevant, None if bound is None else scale * bound)
            results.append(res)
    return results


def grad_failure_message(cell: Cell, shift: int, results: list[CheckResult]) -> str:
    """A standalone message for a failed gradient cell: what, where, how far off, why, a repro."""
    bad = [r for r in results if not r.ok]
    lines = [f"gradients of {cell.api.id} on {cell.case.id} (seed {cell.case.seed(shift)}), {cell.dtype}, "
             f"{cell.device}, {cell.layout}: {len(bad)} of {len(results)} checks failed"]  # fmt: skip
    for r in bad:
        lines.append(f"  {r.api.split(' ')[0]} reduction={r.reduction}: max abs {r.max_abs:.3g}, "
                     f"max rel {r.max_rel:.3g}, tolerance {r.tolerance:.3g}")  # fmt: skip
        lines += [f"    - {p}" for p in r.problems]
    lines.append(f"  tolerance: {bad[0].reason if bad else ''}")
    lines.append(f"  repro: {grad_repro(cell, shift)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- repro


def main(argv: Sequence[str] | None = None) -> int:
    """Run one gradient cell and print its verdict; exit status 1 if any check failed, 2 on bad input."""
    ap = argparse.ArgumentParser(prog="python -m klparity.gradients", description=main.__doc__)
    ap.add_argument("--framework", required=True, choices=sorted(REGISTRY))
    ap.add_argument(
        "--api", required=True, help="API id as printed, e.g. 'torch.nn.functional.kl_div(log_target=True)'"
    )
    ap.add_argument("--case", required=True)
    ap.add_argument("--dtype", required=True, choices=DTYPE_NAMES)
    ap.add_argument("--device", default="cpu", choices=DEVICES)
    ap.add_argument("--layout", default="contiguous", choices=LAYOUTS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    adapter = REGISTRY[args.framework]
    apis = {a.id: a for a in adapter.apis(args.dtype)} if adapter.available() else {}
    if args.api not in apis:
        print(f"unknown API {args.api!r} for {args.framework} {args.dtype}; known: {', '.join(apis)}", file=sys.stderr)
        return 2
    try:
        case = case_by_id(args.case)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    cell = Cell(args.framework, apis[args.api], case, args.dtype, args.device, args.layout)
    reason = grid.skip_reason(cell, args.seed)
    if reason:
        print(f"skipped: {reason}")
        return 0
    results = run_grad_cell(adapter, cell, args.seed)
    for r in results:
        print(f"{r.api} reduction={r.reduction}: {'ok' if r.ok else 'FAIL'}, max abs {r.max_abs:.3g}, "
              f"err/tol {r.tightness:.3g}" + "".join(f"\n  difference {d}" for d in r.differences))  # fmt: skip
    if not all(r.ok for r in results):
        print(grad_failure_message(cell, args.seed, results))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
