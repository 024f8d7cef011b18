"""One parity check: run a framework API on a case and judge it against the oracle.

A *cell* is (framework, API, case, dtype, device, layout). Running it calls the API once per
reduction and yields one ``CheckResult`` per reduction, each judged twice:

1. **semantics**: the framework against its API's documented formula evaluated exactly in float64
   (``oracle.torch_kl_div`` / ``oracle.keras_kl_divergence``) on the values it saw, within the
   derived tolerance; NaN and inf patterns, result shape and result dtype must match exactly;
2. **meaning**: that formula against the exact KL divergence, reduced the same way. Where they
   differ, the difference must be one of the documented ones in ``DIFFERENCES`` (its size is
   recorded); Keras's clipping gap must stay within its derived bound.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, Protocol, TypeVar, cast

import numpy as np
from numpy.typing import NDArray

from klparity import oracle
from klparity.cases import Case
from klparity.dtypes import dtype_info, round_to, widen
from klparity.frameworks import Adapter, Api, Output
from klparity.frameworks.jax_adapter import KL as OPTAX_KL
from klparity.frameworks.jax_adapter import KL_LOG_TARGETS as OPTAX_KL_LOG_TARGETS
from klparity.frameworks.jax_adapter import REL_ENTR as JAX_REL_ENTR
from klparity.tolerances import Budget, budget, table_row

F64 = NDArray[np.float64]

#: Documented differences between an API's formula and the exact KL (name -> what and why).
DIFFERENCES: Final[dict[str, str]] = {
    "torch.masked_class_nan": "torch computes 0 * log_softmax = 0 * (-inf) = NaN on a class masked "
    "with -inf in both teacher and student; the exact KL gives 0 for that class",
    "torch.log_target_zero_target_nan": "with log_target=True torch computes exp(t) * (t - input) "
    "= 0 * (-inf - x) = NaN where the log-target is -inf; the exact KL gives 0",
    "keras.clip_epsilon": "Keras clips y_true and y_pred to [1e-7, 1] and does not renormalise: "
    "every class with p or q below 1e-7 changes the value",
    "torch.underflow_times_inf_nan": "a teacher probability that underflows to 0 in the tested dtype, "
    "on a class where the student is -inf, gives 0 * inf = NaN; the exact KL is +inf",
    "dtype.result_overflow": "the value exceeds the largest finite number of the result dtype and "
    "rounds to inf (a float16 sum over many classes; torch's 'batchmean' rounds the sum before "
    "dividing, so it overflows with the sum even when the mean would fit)",
    "keras.float16_ratio_overflow": "computing in float16 (keras.losses.kl_divergence on float16 "
    "inputs, or dtype='float16'), y_true / y_pred overflows to inf once it exceeds 65504, which "
    "clipping y_pred to 1e-7 makes easy: the loss is inf where the exact KL is finite",
    "optax.masked_class_nan": "optax.losses.kl_divergence computes targets * (where(targets == 0, 0, "
    "log(targets)) - log_predictions) = 0 * (0 - (-inf)) = NaN on a class masked with -inf in both "
    "teacher and student; the exact KL gives 0 for that class",
    "optax.log_targets_zero_target_nan": "optax.losses.kl_divergence_with_log_targets computes "
    "exp(log_targets) * (log_targets - log_predictions) = 0 * (-inf - x) = NaN where the log-target is "
    "-inf; the exact KL gives 0",
    "jax.rel_entr_nan_is_inf": "jax.scipy.special.rel_entr(p, q) is +inf, not NaN, where p or q is NaN "
    "(neither its p > 0 nor its p == 0 branch holds; SciPy's rel_entr gives NaN): a row with a NaN logit "
    "sums to +inf where the exact KL is NaN",
    "optax.underflow_times_inf_nan": "a teacher probability that underflows to 0 in the tested dtype, "
    "on a class where the student is -inf, gives 0 * inf = NaN in both optax losses (as in torch); the "
    "exact KL is +inf",
    "jax.rel_entr_underflow_hides_inf": "a teacher probability that underflows to 0 in the compute dtype, "
    "on a class where the student is -inf, makes that term rel_entr(0, 0) = 0: the row is finite where "
    "the exact KL is +inf",
    "jax.rel_entr_underflow_inf": "rel_entr takes probabilities: where the student's softmax underflows "
    "to 0 in the compute dtype (below half its smallest subnormal, or below its smallest normal where the "
    "backend flushes subnormals, as XLA:CPU does) and the teacher's does not, the term is +inf although "
    "log q is finite and so is the exact KL; the log-space optax losses do not have this",
}

TORCH_MEAN_WARNING: Final = "'mean' divides the total loss by both the batch size and the support size"


@dataclass
class CheckResult:
    """The verdict on one reduction of one cell, JSON-serialisable via ``to_dict``."""

    framework: str
    api: str
    reduction: str
    dtype: str
    device: str
    layout: str
    case: str
    seed: int
    ok: bool = True
    max_abs: float = 0.0
    max_rel: float = 0.0
    tightness: float = 0.0  #: max over entries of |error| / tolerance
    tolerance: float = 0.0  #: largest tolerance over entries
    exact_gap: float = 0.0  #: |API formula - exact KL|, max over entries (a documented difference)
    problems: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    reason: str = ""

    def fail(self, message: str) -> None:
        """Record a problem; the check fails."""
        self.ok = False
        self.problems.append(message)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with JSON-safe floats (inf/nan as strings)."""
        d: dict[str, Any] = {}
        for f in fields(self):  # shallow: asdict's deep copies cost more than the check itself
            v = getattr(self, f.name)
            if isinstance(v, list):
                v = list(v)
            elif isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            d[f.name] = v
        return d


@dataclass(frozen=True)
class Exact:
    """Float64 quantities derived from the rounded logits of one case."""

    teacher: F64
    student: F64
    temperature: float
    zt: F64
    zs: F64
    lp: F64
    lq: F64
    p: F64
    q: F64
    rows: F64  #: exact per-row KL

    @classmethod
    def of(cls, teacher: F64, student: F64, temperature: float, oracle_name: str = "numpy") -> Exact:
        """Everything derived from the rounded logits; ``oracle_name`` picks the exact rows (``ORACLES``)."""
        if oracle_name not in ORACLES:
            raise ValueError(f"unknown oracle {oracle_name!r}; expected one of {', '.join(ORACLES)}")
        with np.errstate(invalid="ignore"):
            zt, zs = teacher / temperature, student / temperature
        lp, lq = oracle.log_softmax(teacher, temperature), oracle.log_softmax(student, temperature)
        return cls(
            teacher, student, temperature, zt, zs, lp, lq, np.exp(lp), np.exp(lq),
            oracle.kl_from_logits(teacher, student, temperature) if oracle_name == "numpy"
            else scipy_rows(teacher, student, temperature),
        )  # fmt: skip


_V = TypeVar("_V")


class _Kept:
    """Least-recently-used store of read-only arrays, bounded by their bytes.

    Every API of a framework, the skip check and the gradient cells judge the same case in the same
    dtype: the rounded logits and their exact quantities are made once per process, not once per
    cell. Values are read-only, so no caller can change what the next one reads.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._items: OrderedDict[tuple[object, ...], tuple[Any, int]] = OrderedDict()

    def get(self, key: tuple[object, ...], make: Callable[[], tuple[_V, list[NDArray[Any]]]]) -> _V:
        """The value kept under ``key``, else ``make()``'s value (its arrays made read-only), kept if it fits."""
        if key in self._items:
            self._items.move_to_end(key)
            value: _V = self._items[key][0]
            return value
        value, arrays = make()
        size = 64  # the entry itself, so that entries without arrays are bounded too
        for a in arrays:
            a.flags.writeable = False
            size += a.nbytes
        if size <= self.limit:
            self._items[key] = (value, size)
            self.used += size
            while self.used > self.limit:
                _, (_, freed) = self._items.popitem(last=False)
                self.used -= freed
        return value


#: the quick tier's cases in one dtype take ~26 MiB of exact quantities; the full tier's do not fit
_KEPT = _Kept(64 << 20)


def rounded(case: Case, shift: int, dtype: str) -> tuple[NDArray[np.generic], NDArray[np.generic]]:
    """The case's (teacher, student) logits rounded to ``dtype``: what a framework receives (read-only)."""

    def make() -> tuple[tuple[NDArray[np.generic], NDArray[np.generic]], list[NDArray[Any]]]:
        t64, s64 = case.logits(shift)
        t_r, s_r = round_to(t64, dtype), round_to(s64, dtype)
        return (t_r, s_r), [t_r, s_r]

    return _KEPT.get(("rounded", case, shift, dtype), make)


def case_overflow(case: Case, shift: int, dtype: str) -> str | None:
    """``overflow_reason`` of the case's logits rounded to ``dtype`` (kept: every API's cell asks)."""

    def make() -> tuple[str | None, list[NDArray[Any]]]:
        t_r, s_r = rounded(case, shift, dtype)
        return overflow_reason(widen(t_r), widen(s_r), case.temperature, dtype), []

    return _KEPT.get(("overflow", case, shift, dtype), make)


def case_exact(case: Case, shift: int, dtype: str, oracle_name: str = "numpy") -> Exact:
    """``Exact.of`` the case's logits rounded to ``dtype`` (read-only arrays)."""

    def make() -> tuple[Exact, list[NDArray[Any]]]:
        t_r, s_r = rounded(case, shift, dtype)
        ex = Exact.of(widen(t_r), widen(s_r), case.temperature, oracle_name)
        return ex, [getattr(ex, f.name) for f in fields(ex) if isinstance(getattr(ex, f.name), np.ndarray)]

    return _KEPT.get(("exact", case, shift, dtype, oracle_name), make)


#: Exact per-row KL: ``numpy`` is ``oracle.kl_from_logits`` (log space, phi-form sum); ``scipy`` is
#: the cross-oracle ``scipy_rows`` (``--klparity-oracle``), an independent second implementation.
ORACLES: Final = ("numpy", "scipy")


def scipy_rows(teacher: F64, student: F64, temperature: float) -> F64:
    """Per-row ``sum(scipy.special.rel_entr(p, q), axis=-1)``, p and q the float64 softmax of the logits.

    In probability space: a class whose float64 probability underflows to 0 while its log-probability
    is finite is lost (and gives +inf against a teacher with mass there), unlike ``kl_from_logits``.
    """
    import scipy.special  # lazily: SciPy belongs to the test extra, not to the package's dependencies

    p, q = oracle.softmax(teacher, temperature), oracle.softmax(student, temperature)
    return np.asarray(np.sum(scipy.special.rel_entr(p, q), axis=-1), dtype=np.float64)


def overflow_reason(teacher: F64, student: F64, temperature: float, dtype: str) -> str | None:
    """Why a case is meaningless in ``dtype`` (logits / T or their spread overflow), else None."""
    with np.errstate(invalid="ignore", over="ignore"):
        both = np.concatenate([teacher.ravel(), student.ravel()]) / temperature
    finite = both[np.isfinite(both)]
    biggest = float(np.max(np.abs(finite))) if finite.size else 0.0
    if 2.0 * biggest >= dtype_info(dtype).max:
        return f"|logits / T| up to {biggest:.3g} overflows {dtype} (max {dtype_info(dtype).max:.3g})"
    return None


# ---------------------------------------------------------------------------------- comparison


def _index(mask: NDArray[np.bool_]) -> str:
    idx = np.argwhere(mask)
    return str(tuple(int(i) for i in idx[0])) if idx.size else "()"


def compare(res: CheckResult, obs: F64, ref: F64, tol: F64 | float) -> None:
    """Judge ``obs`` against ``ref`` entrywise: NaN/inf patterns exactly, finite values within ``tol``."""
    obs, ref = np.asarray(obs, np.float64), np.asarray(ref, np.float64)
    tol_a = np.broadcast_to(np.asarray(tol, np.float64), ref.shape)
    if obs.shape != ref.shape:
        res.fail(f"result shape {obs.shape}, expected {ref.shape}")
        return
    if np.isfinite(obs).all() and np.isfinite(ref).all():  # the common case: no NaN/inf pattern to match
        _compare_finite(res, obs, ref, tol_a, None)
        return
    nan_o, nan_r = np.isnan(obs), np.isnan(ref)
    if (nan_o & ~nan_r).any():
        i = nan_o & ~nan_r
        res.fail(f"NaN where the reference is finite at {int(i.sum())} of {i.size} entries, first "
                 f"at {_index(i)} (reference {ref[tuple(np.argwhere(i)[0])]:.17g})")  # fmt: skip
    if (nan_r & ~nan_o).any():
        i = nan_r & ~nan_o
        res.fail(f"value where the reference is NaN at {int(i.sum())} of {i.size} entries, first "
                 f"at {_index(i)} (got {obs[tuple(np.argwhere(i)[0])]:.17g}): NaN must propagate")  # fmt: skip
    inf_r = np.isinf(ref)
    if (inf_r & (obs != ref)).any():
        i = inf_r & (obs != ref)
        res.fail(f"reference is {ref[tuple(np.argwhere(i)[0])]} at {_index(i)}, got "
                 f"{obs[tuple(np.argwhere(i)[0])]:.17g}")  # fmt: skip
    fin = np.isfinite(ref) & ~nan_o
    if fin.any():
        _compare_finite(res, obs, ref, tol_a, fin)


def _compare_finite(res: CheckResult, obs: F64, ref: F64, tol_a: F64, fin: NDArray[np.bool_] | None) -> None:
    """The value part of ``compare``, on the entries ``fin`` where the reference is finite (None: all)."""
    if fin is None:  # views, no copies: the common case, and the arrays can be large (gradients)
        o, r, t = obs.reshape(-1), ref.reshape(-1), np.broadcast_to(tol_a, ref.shape).reshape(-1)
    else:
        o, r, t = obs[fin], ref[fin], tol_a[fin]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        err = np.abs(o - r)
        absr = np.abs(r)
        # relative error is undefined where the reference is exactly 0; a zero tolerance allows no error
        rel = np.divide(err, absr, out=np.zeros_like(err), where=absr != 0)
        ratio = np.divide(err, t, out=np.where(err == 0, 0.0, np.inf), where=t > 0)
    k = int(np.argmax(ratio))
    res.max_abs = max(res.max_abs, float(np.max(err)))
    res.max_rel = max(res.max_rel, float(np.max(rel)))
    res.tightness = max(res.tightness, float(ratio[k]))
    res.tolerance = max(res.tolerance, float(np.max(t)))
    if ratio[k] > 1.0:
        n_bad = int(np.count_nonzero(ratio > 1.0))
        if not ref.ndim:
            where: tuple[int, ...] = ()
        elif fin is None:
            where = tuple(int(v) for v in np.unravel_index(k, ref.shape))
        else:
            where = tuple(int(v) for v in np.argwhere(fin)[k])
        res.fail(f"error {float(err[k]):.3g} exceeds tolerance {float(t[k]):.3g} "
                 f"({float(ratio[k]):.3g}x) at {where}: got {float(o[k]):.17g}, "
                 f"reference {float(r[k]):.17g}, {n_bad} of {ratio.size} entries off")  # fmt: skip


# --------------------------------------------------------------------------- API semantics


@dataclass(frozen=True)
class Expectation:
    """What one reduction of an API must return, how close, and what the exact KL says."""

    value: F64
    tolerance: F64 | float
    exact: F64
    gap_bound: F64 | float | None  #: derived bound on |value - exact|, or None (must be equal)
    dtype: str
    must_warn: str | None
    #: rows where +inf is accepted too: whether an underflow happens there is within rounding error
    inf_allowed: NDArray[np.bool_] | None = None
    #: entries where NaN is accepted too (an underflow to 0 meeting -inf, within rounding error)
    nan_allowed: NDArray[np.bool_] | None = None


def _rounding_band(ex: Exact, dtype: str) -> F64:
    """Relative error of a probability computed in ``dtype`` (the softmax stage of the error model)."""
    u = dtype_info(dtype).unit_roundoff
    with np.errstate(invalid="ignore"):
        mt = np.max(np.where(np.isfinite(ex.zt), np.abs(ex.zt), 0.0), axis=-1, keepdims=True)
        rho = np.where(np.isfinite(ex.zt), np.abs(ex.zt), 0.0) + mt + math.log2(max(ex.p.shape[-1], 2)) + 1.0
    return np.asarray(np.minimum(0.5, 4.0 * u * rho), np.float64)


def _underflow_meets_student_inf(
    ex: Exact, dtype: str, flushes: bool = False
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Classes where the student is -inf and the teacher's mass underflows to 0 in ``dtype``.

    There torch (and optax) compute 0 * inf = NaN where the exact KL is +inf. Returns (surely, maybe):
    the probability is below half the smallest subnormal even after its rounding error, or near it
    (up to the smallest normal number when the backend ``flushes`` subnormals to zero).
    """
    info = dtype_info(dtype)
    half = 0.5 * info.smallest_subnormal
    top = info.smallest_normal if flushes else half
    band = _rounding_band(ex, dtype)
    student_inf = (ex.lq == -np.inf) & (ex.p > 0)
    surely = student_inf & (ex.p * (1.0 + band) < half)
    maybe = student_inf & ~surely & (ex.p * (1.0 - band) <= top)
    return surely, maybe


def _torch_expectations(api: Api, ex: Exact, bud: Budget, dtype: str) -> dict[str, Expectation]:
    log_target = bool(api.option("log_target", False))
    flushed, maybe = _underflow_meets_student_inf(ex, dtype)
    target = np.where(flushed, -np.inf, ex.lp) if log_target else np.where(flushed, 0.0, ex.p)
    pointwise = oracle.torch_pointwise(ex.lq, target, log_target=log_target)
    with np.errstate(invalid="ignore"):
        exact_pointwise = np.where(ex.p == 0, 0.0, ex.p * (ex.lp - ex.lq))
    exact_pointwise = np.where(np.isnan(ex.rows)[..., None], np.nan, exact_pointwise)
    out = {}
    for red in api.reductions:
        r = "mean" if red == "default" else red
        if r == "none":
            tol: F64 | float = bud.elementwise()
        else:
            tol = bud.total() / {"sum": 1, "mean": pointwise.size, "batchmean": pointwise.shape[0]}[r]
        total = float(np.sum(ex.rows))
        divisor = {"none": 1, "sum": 1, "mean": pointwise.size, "batchmean": pointwise.shape[0]}[r]
        out[red] = Expectation(
            value=oracle.torch_reduce(pointwise, r),
            tolerance=tol,
            exact=np.asarray(exact_pointwise) if r == "none" else np.asarray(total / divisor),
            gap_bound=None,
            dtype=dtype,
            must_warn=TORCH_MEAN_WARNING if r == "mean" else None,
            nan_allowed=maybe if r == "none" else np.asarray(maybe.any()),
        )
    return out


def _keras_expectations(
    api: Api, ex: Exact, dtype: str, compute: str, framework: str
) -> tuple[dict[str, Expectation], Budget]:
    eps = float(round_to(np.asarray(oracle.KERAS_EPSILON), compute))
    cmax = dtype_info(compute).max
    pt, qt = np.clip(ex.p, eps, 1.0), np.clip(ex.q, eps, 1.0)
    bud = budget(framework=framework, input_dtype=dtype, compute_dtype=compute, p=pt, q=qt,
                 zt=ex.zt, zs=ex.zs, student_is_probability=True)  # fmt: skip
    gap_rows = oracle.keras_clip_gap_bound(ex.p, ex.q, epsilon=eps)
    # y_true / y_pred overflows the compute dtype past max * (1 + u) (the rounding boundary); the
    # ratio carries the relative error of both softmaxes (band), so near the boundary either is right
    boundary = cmax * (1.0 + dtype_info(compute).unit_roundoff)
    band = np.minimum(0.5, 2.0 * _rounding_band(ex, dtype) + 4.0 * dtype_info(compute).unit_roundoff)
    with np.errstate(invalid="ignore", over="ignore"):
        ratio = pt / qt
        surely = ratio * (1.0 - band) >= boundary
        maybe_rows = np.any(~surely & (ratio * (1.0 + band) >= boundary), axis=-1)
    cmax_eff = np.where(surely, 0.0, np.inf)  # oracle: ratio > compute_max becomes inf
    gap_rows = np.where(np.any(surely, axis=-1) | maybe_rows, np.inf, gap_rows)
    out = {}
    for red in api.reductions:
        r = "sum_over_batch_size" if red == "default" else red
        nrows = max(ex.rows.size, 1)
        tol_rows = bud.rows()
        if r == "none" or ex.rows.ndim == 0:
            tol: F64 | float = tol_rows
            gap: F64 | float = gap_rows
        else:
            div = 1 if r == "sum" else nrows
            tol, gap = float(bud.total()) / div, float(np.sum(gap_rows)) / div
        out[red] = Expectation(
            value=oracle.keras_kl_divergence(ex.p, ex.q, reduction=r, epsilon=eps, compute_max=cmax_eff),
            tolerance=tol,
            exact=oracle.keras_reduce(ex.rows, r),
            gap_bound=gap,
            dtype=compute,
            must_warn=None,
            inf_allowed=maybe_rows if (r == "none" or ex.rows.ndim == 0) else np.asarray(maybe_rows.any()),
        )
    return out, bud


def _differences(api: Api, ex: Exact, compute: str) -> list[str]:
    """Documented differences whose condition holds for this case and API."""
    if api.semantics == "optax":
        return _optax_differences(api, ex, compute)
    found = []
    if api.semantics == "keras" and compute == "float16":
        eps = float(round_to(np.asarray(oracle.KERAS_EPSILON), compute))
        with np.errstate(invalid="ignore"):
            ratio = np.clip(ex.p, eps, 1.0) / np.clip(ex.q, eps, 1.0)
        if np.any(ratio * 1.5 > dtype_info(compute).max):  # overflowing, or within the rounding band
            found.append("keras.float16_ratio_overflow")
    if api.semantics == "torch":
        if np.any((ex.lp == -np.inf) & (ex.lq == -np.inf)):
            found.append("torch.masked_class_nan")
        if api.option("log_target") and np.any(ex.lp == -np.inf):
            found.append("torch.log_target_zero_target_nan")
        surely, maybe = _underflow_meets_student_inf(ex, compute)
        if np.any(surely | maybe):
            found.append("torch.underflow_times_inf_nan")
    elif np.any((ex.p < oracle.KERAS_EPSILON) | (ex.q < oracle.KERAS_EPSILON)):
        found.append("keras.clip_epsilon")
    return found


def _judge_meaning(res: CheckResult, exp: Expectation, known: list[str]) -> None:
    value, exact = np.asarray(exp.value), np.asarray(exp.exact)
    with np.errstate(invalid="ignore"):
        gap = np.abs(value - exact)
    same_nan = np.isnan(value) == np.isnan(exact)
    both_inf_equal = np.isinf(exact) & (value == exact)
    tol = np.broadcast_to(np.asarray(exp.tolerance, np.float64), exact.shape)
    close = same_nan & (np.isnan(exact) | both_inf_equal | (gap <= tol))
    if bool(np.all(close)):
        return
    differing = gap[~close]
    finite_gap = differing[np.isfinite(differing)]
    res.exact_gap = float(np.max(finite_gap)) if finite_gap.size else math.inf
    if not known:
        res.fail(f"the API formula differs from the exact KL (gap {res.exact_gap:.3g}) with no "
                 "documented difference to explain it: an oracle bug or an undocumented quirk")  # fmt: skip
        return
    res.differences = [f"{name}: {DIFFERENCES[name]} (gap here {res.exact_gap:.3g})" for name in known]
    if exp.gap_bound is not None:
        bound = np.broadcast_to(np.asarray(exp.gap_bound, np.float64), exact.shape)
        with np.errstate(invalid="ignore"):
            over = same_nan & np.isfinite(exact) & (gap > bound + tol)
        if over.any():
            res.fail(f"gap to the exact KL {float(np.max(gap[over])):.3g} exceeds the derived "
                     f"clipping bound {float(np.max(bound[over])):.3g}")  # fmt: skip


def _alternatives(obs: F64, exp: Expectation, shape: tuple[int, ...]) -> str:
    """On a scalar mismatch, name the divisor that would explain the observed value."""
    if np.ndim(obs) or not np.isfinite(obs) or np.ndim(exp.value) or not exp.value:
        return ""
    ratio = float(obs / exp.value)
    names = {
        "B (rows of axis 0)": shape[0], "B*S (all rows)": math.prod(shape[:-1]) or 1,
        "C (classes)": shape[-1], "numel": math.prod(shape),
    }  # fmt: skip
    for name, n in names.items():
        for factor, word in ((n, "multiplied"), (1.0 / n, "divided")):
            if n > 1 and abs(ratio / factor - 1.0) < 1e-2:
                return f"; the observed value is the expected one {word} by {name} = {n}"
    return f"; observed / expected = {ratio:.6g}"


# ------------------------------------------------------------------------ optax / JAX (per row)
# optax.losses.kl_divergence is p * (where(p == 0, 0, log p) - log q) and ..._with_log_targets is
# exp(lp) * (lp - log q), summed over the last axis (optax 0.2.8, optax/losses/_classification.py).
# In exact arithmetic, special values included (0 * -inf = NaN on a masked class, +inf where only the
# student is -inf), these are torch's two pointwise formulas, so oracle.torch_pointwise models them
# (tests/unit/test_jax_adapter.py runs optax in float64 against it on special values).


def _xla_flushes(dtype: str) -> bool:
    """XLA:CPU flushes float32, bfloat16 and float64 subnormals to zero, not float16 (computed in float32)."""
    return dtype != "float16"


def _rel_entr_masks(ex: Exact, framework: str, dtype: str) -> dict[str, NDArray[np.bool_]]:
    """Per class: p or q surely 0 (``p_zero``, ``q_zero``) or surely nonzero (``p_kept``, ``q_kept``)
    in ``dtype``, as ``rel_entr_inf_rows`` describes; ``nan_rows`` per row."""
    info, row = dtype_info(dtype), table_row(framework, dtype)
    log2c = math.log2(max(ex.p.shape[-1], 2))
    log_half_eta = math.log(info.smallest_subnormal) - math.log(2.0)
    log_normal = math.log(info.smallest_normal)

    def zero_and_kept(z: F64, logp: F64) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
        with np.errstate(invalid="ignore"):
            fin = np.isfinite(z)
            m = np.max(np.where(fin, np.abs(z), 0.0), axis=-1, keepdims=True)
            err = row.c_in * info.unit_roundoff * (np.where(fin, np.abs(z), 0.0) + m + log2c + 1.0)
            unnormalised = logp - np.max(logp, axis=-1, keepdims=True)  # log exp(z_j - max z)
            zero = (logp == -np.inf) | (unnormalised + err < log_half_eta)
            kept = np.isfinite(logp) & (logp - err > log_normal)
        return zero, kept

    p_zero, p_kept = zero_and_kept(ex.zt, ex.lp)
    q_zero, q_kept = zero_and_kept(ex.zs, ex.lq)
    nan_rows = np.asarray(np.isnan(ex.lp).any(axis=-1) | np.isnan(ex.lq).any(axis=-1), dtype=np.bool_)
    return {"p_zero": p_zero, "p_kept": p_kept, "q_zero": q_zero, "q_kept": q_kept, "nan_rows": nan_rows}


def rel_entr_inf_rows(
    ex: Exact, framework: str, dtype: str
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Rows where ``sum(jax.scipy.special.rel_entr(p, q), -1)`` is +inf in ``dtype``: (surely, possibly).

    JAX computes p and q = softmax(z) as exp(z - max z) / sum in ``dtype``; rel_entr is +inf where
    q_j = 0 < p_j, and for NaN arguments. A probability is surely 0 where its logit is -inf or where
    exp(z_j - max z) is below half the smallest subnormal even after the softmax stage's error (it rounds
    to 0 under any rounding or flushing, and division keeps it 0); surely nonzero where it exceeds the
    smallest normal after that error (some backends flush subnormals: XLA:CPU does for float32, float64
    and bfloat16, not for float16, which it computes in float32). In between the backend and rounding
    decide. The error of log p_j is the tolerance model's softmax-stage term, c_in u (|z_j| + max|z| +
    log2 C + 1), with c_in from the (framework, dtype) row.
    """
    return _rel_entr_rows(_rel_entr_masks(ex, framework, dtype))


def _rel_entr_rows(m: dict[str, NDArray[np.bool_]]) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """``rel_entr_inf_rows`` from the masks of ``_rel_entr_masks``."""
    surely = np.any(m["q_zero"] & m["p_kept"], axis=-1) | m["nan_rows"]
    possibly = surely | np.any(~m["q_kept"] & ~m["p_zero"], axis=-1)
    return surely, possibly


def _optax_expectations(
    api: Api, ex: Exact, dtype: str, framework: str
) -> tuple[dict[str, Expectation], Budget]:
    """Per-row value of the optax losses / summed rel_entr (the single reduction ``'none'``)."""
    rel_entr = api.entry == JAX_REL_ENTR
    bud = budget(framework=framework, input_dtype=dtype, compute_dtype=dtype, p=ex.p, q=ex.q, zt=ex.zt,
                 zs=ex.zs, student_is_probability=rel_entr, log_p=ex.lp, log_q=ex.lq)  # fmt: skip
    inf_allowed = nan_allowed = None
    if api.entry in (OPTAX_KL, OPTAX_KL_LOG_TARGETS):
        # teacher mass that underflows to 0 where the student is -inf: 0 * inf = NaN, as in torch
        flushed, maybe = _underflow_meets_student_inf(ex, dtype, flushes=_xla_flushes(dtype))
        if api.entry == OPTAX_KL:
            pointwise = oracle.torch_pointwise(ex.lq, np.where(flushed, 0.0, ex.p), log_target=False)
        else:
            pointwise = oracle.torch_pointwise(ex.lq, np.where(flushed, -np.inf, ex.lp), log_target=True)
        value = np.sum(pointwise, axis=-1)
        nan_allowed = np.asarray(maybe.any(axis=-1))
    elif rel_entr:
        masks = _rel_entr_masks(ex, framework, dtype)
        surely, possibly = _rel_entr_rows(masks)
        # where the student is -inf, teacher mass that is not surely kept may be 0: rel_entr(0, 0) = 0
        # there (the value below; +inf is allowed too, through ``possibly``)
        dropped = (ex.lq == -np.inf) & ~masks["p_kept"]
        value = np.where(surely, np.inf, oracle.kl_from_log_probs(np.where(dropped, -np.inf, ex.lp), ex.lq))
        inf_allowed = possibly & ~surely
    else:
        raise ValueError(f"no optax-semantics formula for {api.entry!r}")
    exp = Expectation(value=np.asarray(value, np.float64), tolerance=bud.rows(), exact=ex.rows,
                      gap_bound=None, dtype=dtype, must_warn=None, inf_allowed=inf_allowed,
                      nan_allowed=nan_allowed)  # fmt: skip
    return {red: exp for red in api.reductions}, bud


def accept_inf_where_allowed(
    expected: dict[str, Expectation], outputs: dict[str, Output]
) -> dict[str, Expectation]:
    """Where +inf (or NaN) is allowed within rounding error and the API returned it, expect it."""
    out = {}
    for red, exp in expected.items():
        if red in outputs:
            obs = np.asarray(outputs[red].value)
            value = np.asarray(exp.value)
            if exp.inf_allowed is not None:
                value = np.where(exp.inf_allowed & (obs == np.inf), np.inf, value)
            if exp.nan_allowed is not None:
                value = np.where(exp.nan_allowed & np.isnan(obs), np.nan, value)
            exp = replace(exp, value=value)
        out[red] = exp
    return out


def _overflow_masks(value: F64, tol: F64 | float, dtype: str) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """(surely, maybe): |value| beyond the dtype's rounding boundary to inf, beyond any doubt or within ``tol``."""
    info = dtype_info(dtype)
    boundary = info.max * (1.0 + info.unit_roundoff)
    value = np.asarray(value, np.float64)
    tol_a = np.broadcast_to(np.asarray(tol, np.float64), value.shape)
    with np.errstate(invalid="ignore"):
        surely = np.isfinite(value) & (np.abs(value) - tol_a >= boundary)
        maybe = np.isfinite(value) & ~surely & (np.abs(value) + tol_a >= boundary)
    return surely, maybe


def _torch_sum_overflow(expected: dict[str, Expectation]) -> tuple[dict[str, Expectation], bool]:
    """torch's 'batchmean' rounds the *sum* to the result dtype before dividing by size(0), so it
    overflows to inf with the sum (float16: past 65504) even when the mean is representable."""
    if "sum" not in expected or "batchmean" not in expected:
        return expected, False
    total = expected["sum"]
    surely, maybe = _overflow_masks(total.value, total.tolerance, total.dtype)
    if not (surely.any() or maybe.any()):
        return expected, False
    bm = expected["batchmean"]
    with np.errstate(invalid="ignore"):
        value = np.where(surely, np.copysign(np.inf, np.asarray(total.value)), bm.value)
    allowed = maybe if bm.inf_allowed is None else (bm.inf_allowed | maybe)
    return {**expected, "batchmean": replace(bm, value=value, inf_allowed=allowed)}, True


def within_result_range(expected: dict[str, Expectation]) -> tuple[dict[str, Expectation], bool]:
    """Values beyond the result dtype's largest finite number round to inf; near it, either is right.

    Returns the adjusted expectations and whether any value reached that range.
    """
    out, hit = {}, False
    for red, exp in expected.items():
        value = np.asarray(exp.value, np.float64)
        surely, maybe = _overflow_masks(value, exp.tolerance, exp.dtype)
        if surely.any() or maybe.any():
            hit = True
            allowed = maybe if exp.inf_allowed is None else (exp.inf_allowed | maybe)
            with np.errstate(invalid="ignore"):
                value = np.where(surely, np.copysign(np.inf, value), value)
            exp = replace(exp, value=value, inf_allowed=allowed)
        out[red] = exp
    return out, hit


def _optax_differences(api: Api, ex: Exact, compute: str) -> list[str]:
    """Documented differences of the optax / JAX per-row APIs whose condition holds here."""
    found = []
    if api.entry == OPTAX_KL and np.any((ex.lp == -np.inf) & (ex.lq == -np.inf)):
        found.append("optax.masked_class_nan")
    if api.entry == OPTAX_KL_LOG_TARGETS and np.any(ex.lp == -np.inf):
        found.append("optax.log_targets_zero_target_nan")
    if api.entry in (OPTAX_KL, OPTAX_KL_LOG_TARGETS):
        surely, maybe = _underflow_meets_student_inf(ex, compute, flushes=_xla_flushes(compute))
        if np.any(surely | maybe):
            found.append("optax.underflow_times_inf_nan")
    if api.entry == JAX_REL_ENTR:
        masks = _rel_entr_masks(ex, api.framework, compute)
        if np.any((ex.lq == -np.inf) & (ex.p > 0) & ~masks["p_kept"]):
            found.append("jax.rel_entr_underflow_hides_inf")
        nan_rows = masks["nan_rows"]
        if np.any(nan_rows):
            found.append("jax.rel_entr_nan_is_inf")
        if np.any(_rel_entr_rows(masks)[1] & ~nan_rows):
            found.append("jax.rel_entr_underflow_inf")
    return found


# ------------------------------------------------------------------------------------ driver


@dataclass(frozen=True)
class Cell:
    """A (framework, API, case, dtype, device, layout) combination: one pytest item."""

    framework: str
    api: Api
    case: Case
    dtype: str
    device: str
    layout: str

    @property
    def id(self) -> str:
        return f"{self.api.id}-{self.dtype}-{self.device}-{self.layout}-{self.case.id}"


def repro(cell: Cell, shift: int) -> str:
    """One-line command reproducing a cell outside pytest."""
    return (
        f"klparity run-cell --framework {cell.framework} --api '{cell.api.id}' --case "
        f"{cell.case.id} --dtype {cell.dtype} --device {cell.device} --layout {cell.layout} "
        f"--seed {shift}"
    )


def run_cell(adapter: Adapter, cell: Cell, shift: int = 0,
             call: Callable[..., dict[str, Output]] | None = None, *,
             oracle_name: str = "numpy") -> list[CheckResult]:  # fmt: skip
    """Run one cell and judge every reduction. ``call`` replaces ``adapter.run`` (for tests);
    ``oracle_name`` picks the exact per-row KL (``ORACLES``, ``--klparity-oracle``)."""
    case, dtype = cell.case, cell.dtype
    t_r, s_r = rounded(case, shift, dtype)
    ex = case_exact(case, shift, dtype, oracle_name)
    compute = adapter.compute_dtype(cell.api, dtype)
    if cell.api.semantics == "torch":
        bud = budget(framework=cell.framework, input_dtype=dtype, compute_dtype=compute, p=ex.p,
                     q=ex.q, zt=ex.zt, zs=ex.zs, student_is_probability=False, log_p=ex.lp,
                     log_q=ex.lq)  # fmt: skip
        expected = _torch_expectations(cell.api, ex, bud, compute)
    elif cell.api.semantics == "optax":
        expected, bud = _optax_expectations(cell.api, ex, compute, cell.framework)
    else:
        expected, bud = _keras_expectations(cell.api, ex, dtype, compute, cell.framework)
    outputs = (call or adapter.run)(cell.api, t_r, s_r, case.temperature, cell.device, cell.layout)
    known = _differences(cell.api, ex, compute)
    sum_overflowed = False
    if cell.api.semantics == "torch":
        expected, sum_overflowed = _torch_sum_overflow(expected)
    expected, overflowed = within_result_range(expected)
    if overflowed or sum_overflowed:
        known.append("dtype.result_overflow")
    expected = accept_inf_where_allowed(expected, outputs)
    results = []
    for red, exp in expected.items():
        res = CheckResult(cell.framework, cell.api.id, red, dtype, cell.device, cell.layout,
                          case.id, case.seed(shift), reason=bud.reason)  # fmt: skip
        out = outputs[red]
        compare(res, out.value, exp.value, exp.tolerance)
        if not res.ok:
            res.problems[-1] += _alternatives(out.value, exp, case.shape)
        if out.dtype != exp.dtype:
            res.fail(f"result dtype {out.dtype}, expected {exp.dtype}"
                     + (" (computed through a lower precision?)" if exp.dtype == "float64" else ""))  # fmt: skip
        warned = any(exp.must_warn in w for w in out.warnings) if exp.must_warn else False
        if exp.must_warn and not warned:
            res.fail(f"expected torch's UserWarning containing {exp.must_warn!r}; none was raised "
                     "(has 'mean' changed meaning?)")  # fmt: skip
        if not exp.must_warn and out.warnings:
            res.fail(f"unexpected warning: {out.warnings[0]}")
        _judge_meaning(res, exp, known)
        results.append(res)
    results += _reduction_consistency(cell, case.seed(shift), outputs, compute)
    return results


def _reduction_consistency(cell: Cell, seed: int, outputs: dict[str, Output], compute: str) -> list[CheckResult]:
    """Each reduction against the framework's *own* unreduced output, summed exactly in float64.

    This isolates the reduction kernel from the elementwise error: with t the 'none' output (the
    very values the reduction sums), a sum over n terms accumulated in u_acc is off by at most
    log2(n) u_acc sum|t|, the result is rounded once to the compute dtype and divided once:
    2 u_c |value| (one subnormal spacing where the result is that small). So an accumulator in a
    lower precision, or a wrong divisor, shows even where the end-to-end tolerance is dominated by
    half-precision elementwise rounding.
    """
    if cell.api.semantics not in ("torch", "keras") or "none" not in outputs:
        return []
    pointwise = np.asarray(outputs["none"].value, np.float64)
    if not np.all(np.isfinite(pointwise)) or pointwise.ndim == 0:
        return []  # special values are judged by the main checks; a scalar has nothing to reduce
    reduce = oracle.torch_reduce if cell.api.semantics == "torch" else oracle.keras_reduce
    defaults = {"torch": "mean", "keras": "sum_over_batch_size"}
    u_c = dtype_info(compute).unit_roundoff
    u64 = dtype_info("float64").unit_roundoff
    u_acc = dtype_info(table_row(cell.framework, cell.dtype).accumulate).unit_roundoff
    if compute not in ("float16", "bfloat16"):
        u_acc = max(u_acc, u_c)
    abs_sum = float(np.sum(np.abs(pointwise)))
    n = max(pointwise.size, 2)
    out = []
    for red, got in outputs.items():
        if red == "none":
            continue
        r = defaults[cell.api.semantics] if red == "default" else red
        expected = reduce(pointwise, r)
        divisor = 1 if r == "sum" else (pointwise.shape[0] if r == "batchmean" else pointwise.size)
        # + one subnormal spacing: the result's rounding and division, where it is subnormal
        # (u_acc + u_64: our own float64 pairwise sum of the same terms)
        tol = ((math.log2(n) * (u_acc + u64) + u_c) * abs_sum / divisor + 2 * u_c * abs(float(expected))
               + dtype_info(compute).smallest_subnormal)  # fmt: skip
        if cell.api.semantics == "torch" and r in ("sum", "batchmean"):  # the sum is rounded first
            total = float(np.sum(pointwise))
            surely, maybe = _overflow_masks(np.asarray(total), tol * divisor, compute)
            if bool(surely) or (bool(maybe) and np.isinf(got.value).all()):
                expected = np.asarray(math.copysign(math.inf, total))
        res = CheckResult(cell.framework, cell.api.id, f"{red} vs own none", cell.dtype, cell.device,
                          cell.layout, cell.case.id, seed, reason="reduction of the framework's own "
                          "elementwise output: log2(n) u_acc sum|t| + rounding and division of the result")  # fmt: skip
        compare(res, got.value, expected, tol)
        if not res.ok:
            res.problems[-1] += " (the reduction itself is off: its own elementwise output, summed exactly, disagrees)"
        out.append(res)
    return out


class _CaseLike(Protocol):
    @property
    def id(self) -> str: ...
    def seed(self, shift: int) -> int: ...


class _Located(Protocol):
    """What a failure message names: a cell of any tier (forward, scale)."""

    @property
    def api(self) -> Api: ...
    @property
    def case(self) -> _CaseLike: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def layout(self) -> str: ...


def failure_message(cell: _Located, shift: int, results: list[CheckResult], repro_line: str | None = None) -> str:
    """A message that stands alone: what, where, how far off, the tolerance's reason, a repro
    (``repro_line``, by default the ``klparity run-cell`` command of a forward cell)."""
    bad = [r for r in results if not r.ok]
    lines = [f"{cell.api.id} on {cell.case.id} (seed {cell.case.seed(shift)}), {cell.dtype}, "
             f"{cell.device}, {cell.layout}: {len(bad)} of {len(results)} reductions failed"]  # fmt: skip
    for r in bad:
        lines.append(f"  reduction={r.reduction}: max abs {r.max_abs:.3g}, max rel {r.max_rel:.3g}, "
                     f"tolerance {r.tolerance:.3g}")  # fmt: skip
        lines += [f"    - {p}" for p in r.problems]
    lines.append(f"  tolerance: {bad[0].reason if bad else ''}")
    lines.append(f"  repro: {repro_line if repro_line is not None else repro(cast(Cell, cell), shift)}")
    return "\n".join(lines)
