"""The generic error model every tolerance is derived from, and its framework-independent rows.

A framework's own rows (its roundings per stage, flush-to-zero, sequential sums) are its adapter's
``ErrorProfile``, registered here by ``klparity.frameworks``; no tolerance literal lives elsewhere.

Error model (forward KL from logits, as a distillation user computes it). With u the unit roundoff of
a dtype, p = softmax(t/T) the target, q = softmax(s/T) the student, z = logits/T and m = max z:

* the framework's softmax / log_softmax stage (input dtype, u_in): z = x/T rounds once (u|z|),
  z - m once more (u(|z| + |m|)), the log-sum-exp adds about log2(C) roundings, and the result is
  rounded to the dtype (u|log p|). So log p_j and log q_j each carry an absolute error of at most
  about ``c_in * u_in * (|z_j| + |m| + |log p_j| + log2 C + 1)``;
* the loss kernel (compute dtype, u_c): xlogy / divide, log, multiply, subtract: ``c_k`` roundings,
  each relative to p_j(|log p_j| + |log q_j|); then the sum over n elements, at most
  ``log2(n)`` roundings relative to the sum of |terms| (pairwise / cascade summation);
* the float64 oracle itself: ``c_oracle`` roundings per element plus its own log2(n) sum.

Weighting each log-probability error by p_j gives the per-element scale

    e_j = p_j * (|log p_j| + |log q_j| + |z^t_j| + |z^s_j| + |m^t| + |m^s| + log2 C + 1
                 + rho_j |log p_j - log q_j|),      rho_j = |z^t_j| + |m^t| + log2 C + 1

(the last term: p_j's own relative error, u rho_j, from exp of a rounded z_j - m, multiplies the
log-ratio of its term p_j (log p_j - log q_j))
and the row tolerance ``(c_in u_in + (c_k + log2 n) u_acc + (c_oracle + log2 n) u_64) * sum_j e_j``
plus a subnormal floor: where p_j is below the dtype's smallest normal number its absolute error is
up to half the smallest subnormal eta, contributing ``eta/2 * (1 + |log p_j| + |log q_j|)``. The
bound scales with the size of the summands, not with |KL|, so a KL near zero is judged fairly.
For Keras, p and q are the *clipped* values. Every coefficient below is a rounding count with its
reason; ``tightness = observed error / tolerance`` is measured by the suite and reported.

Gradient error model (``grad_budget``; rows: a framework's ``ErrorProfile.grad_rows``, else
``DEFAULT_GRAD_ROWS``). Every gradient the suite checks has, per row and class k, the form

    d/ds_k = (c/T) (q_k S - P_k),   d/dt_k = (c/T) p_k (h_k - H),   H = sum_j p_j h_j

with c the reduction's scale (sum, 'none': 1; torch mean: 1/numel, batchmean: 1/size(0); Keras
sum_over_batch_size: 1/rows), P_k the target weight the API's backward multiplies (p_k for torch;
clip(p_k) times the clip's 0/1 derivative for Keras), S = sum_j P_j (1 for torch), and h_k the
derivative of the pointwise loss in the target (torch: log p_k + 1 - log q_k; Keras: the same with
clipped values, times the 0/1 derivative of the clip of y_true). Exactly: (q_k - p_k)/T and
p_k (log p_k - log q_k - KL)/T. The framework's p_j and q_j come out of its softmax stage with the
relative errors ``c_in u_in rho_j`` of the forward model (rho^t_j = |z^t_j| + |m^t| + |log p_j| +
log2 C + 1, likewise rho^s_j), so, to first order,

    |err d/ds_k| <= (c/T) [ c_in u_in (P_k rho^t_k + q_k (S rho^s_k + sum_j P_j rho^t_j))
                            + U (P_k + q_k S) ]
    |err d/dt_k| <= (c/T) [ c_in u_in p_k (rho^t_k (|h_k| + |H| + 1) + rho^s_k
                                          + sum_j p_j (rho^t_j (|h_j| + 1) + rho^s_j))
                            + U p_k (|h_k| + |h_k - H| + sum_j p_j |h_j|) ]

(p_k's relative error times h_k and H separately: torch's kl_div backward rounds exp(target) to the
dtype while its log_softmax backward recomputes it in float32, so the two do not cancel; log p_k
and log q_k's absolute errors inside h_k; the same errors summed into H), with
``U = c_kernel max(u_in, u_compute) + n_sum(C) u_acc + c_oracle u_64``: ``c_kernel`` roundings of
the backward pass, each relative to the magnitudes it combines; ``n_sum(C)`` those of the class
sum, which the backward kernels do not sum pairwise (``class_sum_roundings``); the float64
reference's own roundings. Floors: a probability below the input
dtype's smallest normal number carries an absolute error up to eta/2 instead (the same terms with
eta/2 in place of ``u rho P``), every backward rounding can flush to a subnormal
(``c_kernel eta/2 max(1, 1/T)``, the 1/T for roundings before the division by T; eta/2 becomes
the smallest normal number N where a framework flushes subnormals to zero,
``ErrorProfile.flush_to_zero``), and a scale c
below the compute dtype's smallest normal number (float16 'mean' over many elements) is itself
rounded by up to eta_c/2 absolute, a relative error eta_c / (2c) of the whole gradient.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Final

import numpy as np
from numpy.typing import NDArray

from klparity.model import ErrorProfile, Row
from klparity.numerics.dtypes import DTYPES, dtype_info

F64 = NDArray[np.float64]


#: The framework-independent rows, keyed by input dtype: a framework's adapter overrides them in its
#: ``ErrorProfile`` (``klparity.frameworks``) where its kernels round or sum differently.
DEFAULT_ROWS: Final[dict[str, Row]] = {
    "float64": Row(2, 3, "float64", "division, max-shift (2 per |z|, |m|) in log_softmax; "
                   "xlogy, product, difference in kl_div"),
    "float32": Row(2, 3, "float32", "same operation count as float64, float32 roundoff"),
}
#: The framework-independent gradient rows (``grad_budget``): c_in as in the forward rows (the same
#: softmax stage); c_kernel counts the backward pass's roundings per element, relative to the
#: magnitudes it combines (see the module docstring).
DEFAULT_GRAD_ROWS: Final[dict[str, Row]] = {
    "float64": Row(2, 10, "float64", "log-space backward: scale c, -target*c, exp(log q), "
                   "times the class sum, difference, /T (6, student); log t, +1, t/t, "
                   "-input, softmax backward (product, difference, product), /T (10, teacher)"),
    "float32": Row(2, 10, "float32", "same operation count as float64, float32 roundoff"),
}

#: Each framework's own rows and kernel facts, registered by ``klparity.frameworks`` from its adapter.
PROFILES: dict[str, ErrorProfile] = {}
#: Names of the framework-independent profile: NumPy's own roundings (pairwise sums, no flushing), as
#: the float64 references and a user's NumPy loss have them.
GENERIC: Final = ("*", "numpy")


_GENERIC_PROFILE: Final = ErrorProfile()


def register_profile(framework: str, profile: ErrorProfile) -> None:
    """Register ``framework``'s error profile (its adapter's): the tolerance rows follow it from then on."""
    PROFILES[framework] = profile


def profile(framework: str) -> ErrorProfile:
    """The registered profile of ``framework`` (``GENERIC``: the framework-independent one)."""
    if framework in GENERIC:
        return _GENERIC_PROFILE
    try:
        return PROFILES[framework]
    except KeyError:
        raise KeyError(f"no error profile for framework {framework!r}: adapters register theirs when "
                       "klparity.frameworks is imported") from None  # fmt: skip

#: Roundings per element of the float64 oracle (log_softmax: divide, shift, exp, log; phi-form: 2).
ORACLE_ROUNDINGS: Final = 6.0


def table_row(framework: str, dtype: str) -> Row:
    """The row for (framework, dtype): the framework's own, else the framework-independent one."""
    return _row(profile(framework).rows, DEFAULT_ROWS, framework, dtype, "tolerance")


def _row(own: Mapping[str, Row], default: Mapping[str, Row], framework: str, dtype: str, what: str) -> Row:
    dtype_info(dtype)
    row = own.get(dtype) or default.get(dtype)
    if row is None:
        raise KeyError(f"no {what} row for framework {framework!r}, dtype {dtype!r}")
    return row


@dataclass(frozen=True)
class Budget:
    """Per-element error scale and floor of one case, from which every reduction's bound follows."""

    elem_scale: F64  #: e_j, same shape as the logits
    floor: F64  #: subnormal floor per element, same shape
    coeff_elem: float  #: multiplies e_j for an elementwise (``'none'``) comparison
    u_sum: float  #: per-rounding cost of summation (accumulator u plus oracle u)
    reason: str
    #: where the framework sums one term at a time (``ErrorProfile.sequential_sums``): what each element adds to the
    #: partial sums (of the class sum and of both log-sum-exps), same shape; None for pairwise sums
    summands: F64 | None = None

    @property
    def sequential(self) -> bool:
        """The framework's sums add one term at a time (``ErrorProfile.sequential_sums``)."""
        return self.summands is not None

    def plus(self, other: Budget) -> Budget:
        """This budget with ``other``'s per-element scales and floors added (a loss whose summands are
        bounded by the sum of two formulas' summands: the generalized JSD's forward and reverse KL)."""
        return replace(self, elem_scale=np.asarray(self.elem_scale + other.elem_scale, np.float64),
                       floor=np.asarray(self.floor + other.floor, np.float64))  # fmt: skip

    def elementwise(self) -> F64:
        """Tolerance for each element of an unreduced pointwise loss. A sequential log-sum-exp's error
        shifts every log-probability of its row, so it reaches each element too (``summands``)."""
        if self.summands is not None:
            n = self.elem_scale.shape[-1]
            return np.asarray(self.coeff_elem * self.elem_scale + sequential_roundings(n) * self.u_sum * self.summands
                              + self.floor, np.float64)  # fmt: skip
        return self.coeff_elem * self.elem_scale + self.floor

    def rows(self) -> F64:
        """Tolerance for each row sum (over the class axis)."""
        n = self.elem_scale.shape[-1]
        if self.summands is not None:
            return self._sequential(self.elem_scale.sum(axis=-1), self.floor.sum(axis=-1),
                                    self.summands.sum(axis=-1), sequential_roundings(n))  # fmt: skip
        return self._summed(self.elem_scale.sum(axis=-1), self.floor.sum(axis=-1), n)

    def total(self) -> float:
        """Tolerance for the sum over every element."""
        if self.summands is not None:
            return float(self._sequential(self.elem_scale.sum(), self.floor.sum(), self.summands.sum(),
                                          self._sum_roundings(self.elem_scale.size)))  # fmt: skip
        return float(self._summed(self.elem_scale.sum(), self.floor.sum(), self.elem_scale.size))

    def _summed(self, scale: F64 | np.floating, floor: F64 | np.floating, n: int) -> F64:
        log2n = math.log2(max(n, 2))
        return np.asarray((self.coeff_elem + log2n * self.u_sum) * scale + floor, dtype=np.float64)

    def _sequential(self, scale: F64 | np.floating, floor: F64 | np.floating, summands: F64 | np.floating,
                    roundings: float) -> F64:  # fmt: skip
        """A sequential sum's bound: each of its ``roundings`` is off by at most u |partial sum|, every
        partial sum at most the sum of ``summands`` (first order; see ``budget``). Not the e_j, as ``_summed``
        takes for log2 n roundings: with n - 1 of them, the e_j's softmax-stage weights would make it n
        times the size of the terms."""
        return np.asarray(self.coeff_elem * scale + roundings * self.u_sum * summands + floor, dtype=np.float64)

    def _sum_roundings(self, n: int) -> float:
        """Roundings of a sequential sum of n elements: a row's classes one by one, then (over more than
        one row) the row values one by one."""
        classes = self.elem_scale.shape[-1] if self.elem_scale.ndim else n
        rows = max(n // max(classes, 1), 1)
        return sequential_roundings(min(n, classes)) + (sequential_roundings(rows) if rows > 1 else 0.0)


def sequential_roundings(n: int) -> float:
    """Roundings (first order, relative to the sum of |terms|) of a left-to-right sum of n terms: n - 1
    (1 for n <= 2, as log2 2 of a pairwise sum)."""
    return float(max(n - 1, 1))


def _finite_or_zero(x: F64) -> F64:
    return np.where(np.isfinite(x), x, 0.0)


def _abs_log(x: F64) -> F64:
    with np.errstate(divide="ignore"):
        return np.abs(np.log(x))


def budget(
    *,
    framework: str,
    input_dtype: str,
    compute_dtype: str,
    p: F64,
    q: F64,
    zt: F64,
    zs: F64,
    student_is_probability: bool,
    log_p: F64 | None = None,
    log_q: F64 | None = None,
) -> Budget:
    """Error budget for one case.

    ``p``/``q``: the float64 probabilities the kernel multiplies and takes logs of (clipped for
    Keras); ``zt``/``zs``: teacher/student logits divided by T; ``student_is_probability``: the API
    takes q rather than log q, so a subnormal q_j also loses relative accuracy. ``log_p``/``log_q``
    (default ``log p``/``log q``) keep the logs finite where p or q underflow float64.
    """
    row = table_row(framework, input_dtype)
    d_in, d_c, d_acc = dtype_info(input_dtype), dtype_info(compute_dtype), dtype_info(row.accumulate)
    u64 = DTYPES["float64"].unit_roundoff
    sequential = input_dtype in profile(framework).sequential_sums
    with np.errstate(invalid="ignore", over="ignore"):
        mt = np.max(np.where(np.isfinite(zt), np.abs(zt), 0.0), axis=-1, keepdims=True)
        ms = np.max(np.where(np.isfinite(zs), np.abs(zs), 0.0), axis=-1, keepdims=True)
        log2c = math.log2(max(p.shape[-1], 2))
        lp = _finite_or_zero(np.abs(log_p) if log_p is not None else _abs_log(p))
        lq = _finite_or_zero(np.abs(log_q) if log_q is not None else _abs_log(q))
        # a -inf logit (a masked class, a one-hot target) contributes no rounding error of its own
        zt_a, zs_a = _finite_or_zero(np.abs(zt)), _finite_or_zero(np.abs(zs))
        # relative error of p_j itself (it is exp of a rounded z_j - m), which multiplies the
        # log-ratio of its own term: p_j * rho_j * |log p_j - log q_j|.
        rho = zt_a + mt + log2c + 1.0
        with np.errstate(invalid="ignore", divide="ignore"):
            lpv = log_p if log_p is not None else np.log(p)
            lqv = log_q if log_q is not None else np.log(q)
            log_ratio = _finite_or_zero(np.abs(lpv - lqv))
        weight = lp + lq + zt_a + zs_a + mt + ms + log2c + 1.0 + rho * log_ratio
        elem = np.where(p > 0, p * weight, 0.0)
        # Below the smallest normal number N an operation is off by up to eta/2 (eta: smallest
        # subnormal; eta itself for float64, where eta/2 is not representable), or by N where the
        # framework flushes subnormals to zero. Each of the c_in + c_kernel operations on p_j or on
        # its term can round there; the error of p_j is weighted by its log-ratio like above.
        tiny = d_in.smallest_normal
        eta = tiny if input_dtype in profile(framework).flush_to_zero else d_in.smallest_subnormal
        ops = row.c_in + row.c_kernel
        sub_p = np.where(p < tiny, (1.0 + _abs_log(np.maximum(p, eta)) + lq + log_ratio) * ops * eta, 0.0)
        sub_q = np.where(student_is_probability & (q < tiny), p * (eta / np.maximum(q, eta)), 0.0)
        floor = _finite_or_zero(sub_p) + _finite_or_zero(sub_q)
    coeff = row.c_in * d_in.unit_roundoff + row.c_kernel * d_c.unit_roundoff + ORACLE_ROUNDINGS * u64
    # float16/bfloat16 kernels sum in the row's accumulator (float32, measured); a float32 or float64
    # kernel sums in its own compute dtype (Keras computing float64 inputs in float32 sums in float32)
    reduced = d_c.name in ("float16", "bfloat16")
    u_sum = (d_acc.unit_roundoff if reduced else max(d_acc.unit_roundoff, d_c.unit_roundoff)) + u64
    pairwise = f" + log2(n) (u_{d_acc.name} + u_float64)"
    sequential_sum = (f"+ (n - 1) (u_{d_acc.name} + u_float64) * sum_j p_j (|log p_j| + |log q_j| + 2 + "
                      "|log p_j - log q_j|) (sequential sums: the class sum and both log-sum-exps) ")  # fmt: skip
    reason = (
        f"error model: ({row.c_in:g} u_{d_in.name} + {row.c_kernel:g} u_{d_c.name} + "
        f"{ORACLE_ROUNDINGS:g} u_float64{'' if sequential else pairwise}) * sum_j e_j "
        f"{sequential_sum if sequential else ''}+ subnormal floor; row ({framework}, {input_dtype}): {row.reason}"
    )
    # Sequential sums (``Budget._sequential``): every rounding is off by at most u |partial sum|. The loss
    # kernel's class sum: partial sums of p_j (log p_j - log q_j), at most sum_j p_j (|log p_j| + |log q_j|).
    # The log-sum-exp of each softmax (exp terms > 0, so relative to the sum itself) is off by C - 1
    # roundings, which shift every log p_j (or log q_j) alike: the KL moves by that times
    # sum_j p_j (1 + log p_j - log q_j) for the teacher's, sum_j p_j for the student's.
    summands = None
    if sequential:
        with np.errstate(invalid="ignore", over="ignore"):
            summands = np.asarray(np.where(p > 0, p * (lp + lq + 2.0 + log_ratio), 0.0), np.float64)
    return Budget(np.asarray(elem, np.float64), np.asarray(floor, np.float64), coeff, u_sum, reason, summands)


# ------------------------------------------------------------------------------------ gradients


def subnormal_error(framework: str, dtype: str) -> float:
    """Absolute error of one rounding below the smallest normal number: eta/2, or N when flushed.

    For float64, eta/2 itself rounds to 0 in float64, so eta stands in for it.
    """
    info = dtype_info(dtype)
    if dtype in profile(framework).flush_to_zero:
        return info.smallest_normal
    return 0.5 * info.smallest_subnormal or info.smallest_subnormal


def same_sum(dtype: str, n: int, abs_sum: float) -> float:
    """Largest difference between two evaluations of one sum of n terms in ``dtype`` (then one division).

    The pinned facts (``klparity.engine.pinned``) tell which formula a framework applies by recomputing the
    candidates from its own unreduced output: the framework and NumPy sum the same terms in different
    orders, at most log2(n) + 1 roundings apart (pairwise / cascade sums), plus the division: each
    rounding relative to the sum of |terms| ``abs_sum``.
    """
    return (math.log2(max(n, 2)) + 2.0) * dtype_info(dtype).unit_roundoff * abs_sum


def class_sum_roundings(framework: str, n: int) -> float:
    """Roundings (first order, relative to the sum of |terms|) of a backward kernel's sum over n classes:
    the framework's ``ErrorProfile.class_sum_roundings`` (its kernels' reduction structure, measured);
    for anything else (NumPy) pairwise, log2 n + 1."""
    rounds = PROFILES[framework].class_sum_roundings if framework in PROFILES else None
    return rounds(n) if rounds is not None else math.log2(max(n, 2)) + 1.0


def grad_table_row(framework: str, dtype: str) -> Row:
    """The gradient row for (framework, dtype): the framework's own, else the framework-independent one."""
    return _row(profile(framework).grad_rows, DEFAULT_GRAD_ROWS, framework, dtype, "gradient tolerance")


@dataclass(frozen=True)
class GradBudget:
    """Per-element gradient tolerances of one case at reduction scale 1, and how they scale."""

    student_scale: F64  #: (1/T) * first-order bound of d/ds_k, incl. subnormal inputs
    teacher_scale: F64  #: the same for d/dt_k
    student_size: F64  #: (1/T) (P_k + q_k S): the magnitudes a rounded scale multiplies
    teacher_size: F64  #: (1/T) p_k (|h_k| + |H|)
    student_terms: tuple[F64, F64]  #: (P_j, q_k / T): the class sum of c P_j, times q_k
    teacher_terms: tuple[F64, F64]  #: (p_j |h_j|, p_k / T): the class sum of c p_j h_j, times p_k
    flush: float  #: c_kernel eta/2 max(1, 1/T): backward roundings into subnormals (N if flushed)
    tiny: float  #: error of one rounding below the input dtype's smallest normal number
    normal: float  #: the input dtype's smallest normal number
    compute: str  #: dtype the scale c is rounded in
    reason: str

    def _scaled(self, first_order: F64, size: F64, terms: tuple[F64, F64], smallest: float, scale: float) -> F64:
        info = dtype_info(self.compute)
        out = scale * first_order + self.flush
        if 0.0 < scale < info.smallest_normal:  # the scale itself is subnormal: coarse steps
            out = out + scale * (info.smallest_subnormal / (2.0 * scale)) * size
        # summands c x_j of a class sum that fall below the smallest normal number: each is off by
        # up to min(c x_j, tiny) (rounded to 0 or to the subnormal grid), all in the same direction
        # at worst; they matter once c is small (float16 'mean' over 64000 elements). ``smallest`` is
        # the smallest positive x_j: when c times it is normal, no summand is lost.
        x, factor = terms
        if scale * smallest < self.normal:
            small = scale * x
            lost = np.sum(np.where(small < self.normal, np.minimum(small, self.tiny), 0.0), axis=-1, keepdims=True)
            out = out + factor * lost
        return np.asarray(out, np.float64)

    @functools.cached_property
    def _smallest_terms(self) -> tuple[float, float]:
        """Smallest positive summand of the student's and the teacher's class sums (inf if none)."""
        def smallest(x: F64) -> float:
            return float(np.min(x, initial=math.inf, where=x > 0))

        return smallest(self.student_terms[0]), smallest(self.teacher_terms[0])

    def student(self, scale: float) -> F64:
        """Tolerance of each d(loss)/d(student logit) for a reduction of scale ``scale``."""
        return self._scaled(self.student_scale, self.student_size, self.student_terms, self._smallest_terms[0], scale)

    def teacher(self, scale: float) -> F64:
        """Tolerance of each d(loss)/d(teacher logit) for a reduction of scale ``scale``."""
        return self._scaled(self.teacher_scale, self.teacher_size, self.teacher_terms, self._smallest_terms[1], scale)


def grad_budget(
    *,
    framework: str,
    input_dtype: str,
    compute_dtype: str,
    temperature: float,
    weight: F64,
    p: F64,
    q: F64,
    h: F64,
    zt: F64,
    zs: F64,
    log_p: F64,
    log_q: F64,
    student_is_probability: bool,
) -> GradBudget:
    """Gradient error budget of one case (see the module docstring for the derivation).

    ``weight``: P_k, the target weight the student gradient subtracts; ``p``/``q``: float64 target
    and student probabilities; ``h``: the pointwise loss's derivative in the target (finite where
    p > 0); ``zt``/``zs``: logits / T; ``log_p``/``log_q``: float64 log-probabilities (finite where
    p, q underflow); ``student_is_probability``: the API takes q (Keras), so a subnormal q_k also
    costs log q_k an absolute error eta / (2 q_k).
    """
    row = grad_table_row(framework, input_dtype)
    d_in, d_c, d_acc = dtype_info(input_dtype), dtype_info(compute_dtype), dtype_info(row.accumulate)
    u64 = DTYPES["float64"].unit_roundoff
    log2c = math.log2(max(p.shape[-1], 2))
    inv_t = 1.0 / temperature
    u_in = row.c_in * d_in.unit_roundoff
    u_kernel = row.c_kernel * max(d_in.unit_roundoff, d_c.unit_roundoff)
    n_sum = class_sum_roundings(framework, p.shape[-1])
    u_k = u_kernel + n_sum * d_acc.unit_roundoff + ORACLE_ROUNDINGS * u64
    tiny, normal = subnormal_error(framework, input_dtype), d_in.smallest_normal

    def rho(z: F64, lv: F64) -> F64:
        with np.errstate(invalid="ignore"):
            fin = np.isfinite(z)
            m = np.max(np.where(fin, np.abs(z), 0.0), axis=-1, keepdims=True)
            return np.asarray(np.where(fin & np.isfinite(lv), np.abs(z) + m + np.abs(lv) + log2c + 1.0, 0.0))

    def rowsum(x: F64) -> F64:
        return np.asarray(np.sum(x, axis=-1, keepdims=True), np.float64)

    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        rt, rs = rho(zt, log_p), rho(zs, log_q)
        pw = np.where(weight > 0, weight, 0.0)
        pp = np.where(p > 0, p, 0.0)
        qq = np.where(q > 0, q, 0.0)
        s_tot = rowsum(pw)
        # below (or, within its own relative error, at) the smallest normal number: 2 N covers any
        # relative error below 1/2, so a value the framework rounds below N is always included
        sub_w = (pw > 0) & (pw < 2.0 * normal)
        sub_q = (qq > 0) & (qq < 2.0 * normal)
        # student: P_k and q_k S with their softmax-stage errors, plus the kernel's roundings
        # the probabilities multiply last: u * p underflows float64 for subnormal p
        # the softmax stage's relative errors: exp of an exponent off by up to u_in rho, so expm1(u_in rho),
        # not its first order u_in rho, which falls short once u_in rho nears 1 (bfloat16 logits / T in the
        # thousands: exponents off by several units, probabilities by tens of times; u_in rho elsewhere)
        et, es = np.expm1(u_in * rt), np.expm1(u_in * rs)
        first_s = pw * (et + u_k) + qq * (s_tot * es + rowsum(pw * et) + u_k * s_tot)
        # error of a value below N: eta/2 when rounded to the subnormal grid; the value itself
        # (below 2 N, see above) when the framework flushes it to zero
        flushes = input_dtype in profile(framework).flush_to_zero
        e_w, e_q = (np.where(sub, x if flushes else tiny, 0.0) for sub, x in ((sub_w, pw), (sub_q, qq)))
        floor_s = e_w + s_tot * e_q + qq * rowsum(e_w)
        # teacher: p_k (h_k - H)
        hh = np.where((pp > 0) & np.isfinite(h), h, 0.0)
        big_h = rowsum(pp * hh)
        ah, dh = np.abs(hh), np.abs(hh - big_h)
        # p_k's error multiplies h_k and H separately: torch's kl_div backward rounds exp(target) to
        # the dtype while log_softmax's backward recomputes it in float32, so the two do not cancel
        first_t = pp * (
            et * (ah + np.abs(big_h) + 1.0) + es + rowsum(pp * (et * (ah + 1.0) + es))
            + u_k * (ah + dh + rowsum(pp * ah))
        )
        sub_p = (pp > 0) & (pp < 2.0 * normal)
        e_p = np.where(sub_p, pp if flushes else tiny, 0.0)
        floor_t = e_p * (ah + np.abs(big_h) + 1.0) + pp * rowsum(e_p * (ah + 1.0))
        if student_is_probability and not flushes:  # log of a subnormal probability: error eta / (2 q)
            # only where the student's weight is live (Keras: q >= eps, unclipped; a clipped q is eps)
            inv_q = np.where(sub_q & (pw > 0), 1.0 / np.maximum(qq, d_in.smallest_subnormal), 0.0)
            floor_t = floor_t + tiny * pp * (inv_q + rowsum(pp * inv_q))
        # NaN only in rows holding a NaN, whose references are NaN (judged by pattern)
        student_scale = np.where(np.isnan(first_s + floor_s), 0.0, first_s + floor_s) * inv_t
        teacher_scale = np.where(np.isnan(first_t + floor_t), 0.0, first_t + floor_t) * inv_t
        student_size = (pw + qq * s_tot) * inv_t
        teacher_size = pp * (ah + np.abs(big_h)) * inv_t
    if not (np.all(np.isfinite(student_scale)) and np.all(np.isfinite(teacher_scale))):
        raise ValueError("the gradient budget is infinite somewhere: an error-model bug, not a tolerance")
    flush = row.c_kernel * max(tiny, subnormal_error(framework, compute_dtype)) * max(1.0, inv_t)
    coarser = d_in if d_in.unit_roundoff >= d_c.unit_roundoff else d_c
    reason = (
        f"gradient error model: (c/T) [{row.c_in:g} u_{d_in.name} (P_k rho^t_k + q_k (S rho^s_k + "
        f"sum_j P_j rho^t_j)) + ({row.c_kernel:g} u_{coarser.name} + {n_sum:g} u_{d_acc.name} (class sum) + "
        f"{ORACLE_ROUNDINGS:g} u_float64) (P_k + q_k S)] for d/ds (teacher: "
        f"the same for p_k (h_k - H)) + subnormal floors; row (grad:{framework}, {input_dtype}): {row.reason}"
    )
    return GradBudget(
        np.asarray(student_scale, np.float64), np.asarray(teacher_scale, np.float64),
        np.asarray(student_size, np.float64), np.asarray(teacher_size, np.float64),
        (np.asarray(pw, np.float64), np.asarray(qq * inv_t, np.float64)),
        (np.asarray(pp * ah, np.float64), np.asarray(pp * inv_t, np.float64)),
        flush, tiny, normal, compute_dtype, reason,
    )  # fmt: skip


# ------------------------------------------------------------ references vs the mpmath goldens
# The goldens (``klparity.numerics.goldens``) hold KL rows and gradients computed with mpmath at 60 digits
# and rounded to float64 once, so their own error is at most half an ulp: every bound below is the
# error of the float64 or framework computation being judged, nothing else.

#: Relative accuracy the float64 oracle must reach on every finite golden KL row (the issue's
#: target). It holds by a wide margin wherever KL is not small: the phi-form sum has no cancellation.
GOLDEN_ORACLE_REL: Final = 1e-13

#: Roundings that reach each log-probability of the float64 oracle, relative to the weight
#: |z_j| + |m| + |log p_j| + log2 C + 1 (the shift by the row max and the division by T, then the
#: subtraction of the log-sum-exp); the same count bounds softmax(x / T) in the gradient.
GOLDEN_LOGPROB_ROUNDINGS: Final = 2.0

#: Roundings of the gradient that can land below the smallest normal number before the division by
#: T (p_j, q_j, and q_j times the sum of the incoming gradient in softmax's backward), where each
#: loses up to half the smallest subnormal eta absolutely; the division by T is one more.
GOLDEN_GRADIENT_SUBNORMAL_ROUNDINGS: Final = 3.0


def _weights(lp: F64, lq: F64, zt: F64, zs: F64) -> tuple[F64, F64]:
    """rho^t_j, rho^s_j = |z_j| + |max z| + |log p_j| + log2 C + 1 (0 where the class is -inf)."""
    log2c = math.log2(max(zt.shape[-1], 2))
    out = []
    for z, lv in ((zt, lp), (zs, lq)):
        with np.errstate(invalid="ignore"):
            fin = np.isfinite(z)
            m = np.max(np.where(fin, np.abs(z), 0.0), axis=-1, keepdims=True)
            rho = np.where(fin & np.isfinite(lv), np.abs(z) + m + np.abs(lv) + log2c + 1.0, 0.0)
        out.append(np.asarray(rho, np.float64))
    return out[0], out[1]


def oracle_vs_golden(reference: F64, lp: F64, lq: F64, zt: F64, zs: F64) -> F64:
    """Per-row bound on |oracle.kl_from_logits - golden KL|.

    ``GOLDEN_ORACLE_REL * |KL|`` plus an absolute floor for KL near 0: the oracle sums
    q_j phi(p_j / q_j) = q_j psi(d_j) with d_j = log p_j - log q_j, whose derivative in d_j is
    p_j d_j; each d_j carries an absolute error of at most ``GOLDEN_LOGPROB_ROUNDINGS`` u_float64
    (rho^t_j + rho^s_j). So the floor is ``2 u64 sum_j p_j |d_j| (rho^t_j + rho^s_j)``: it vanishes
    as p -> q (identical rows must come out exactly 0) and is ~ sqrt(KL) u64 |z| otherwise. Errors
    in q_j itself change q_j psi(d_j) only relatively (second order in d), inside the relative term.
    """
    rho_t, rho_s = _weights(lp, lq, zt, zs)
    u64 = DTYPES["float64"].unit_roundoff
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(lp)
        d = np.where(np.isfinite(lp) & np.isfinite(lq), np.abs(lp - lq), 0.0)
        floor = GOLDEN_LOGPROB_ROUNDINGS * u64 * np.sum(p * d * (rho_t + rho_s), axis=-1)
        return np.asarray(GOLDEN_ORACLE_REL * np.abs(reference) + floor, np.float64)


def golden_gradient(dtype: str, temperature: float, p: F64, q: F64, lp: F64, lq: F64, zt: F64, zs: F64) -> F64:
    """Elementwise bound on the error of (softmax(s/T) - softmax(t/T)) / T computed in ``dtype``.

    p_j = exp(log p_j) inherits the absolute error of log p_j as a relative one, at most
    ``GOLDEN_LOGPROB_ROUNDINGS`` u rho^t_j (likewise q_j); the subtraction and the division by T add
    one rounding each, 2 u |q_j - p_j|. Below the dtype's smallest normal number a rounding loses up
    to half its smallest subnormal eta absolutely: ``GOLDEN_GRADIENT_SUBNORMAL_ROUNDINGS`` of them
    before the division by T where p_j or q_j is subnormal, and the division itself where the
    result is.
    """
    info = dtype_info(dtype)
    rho_t, rho_s = _weights(lp, lq, zt, zs)
    rel = GOLDEN_LOGPROB_ROUNDINGS * info.unit_roundoff * (p * rho_t + q * rho_s)
    half_eta = 0.5 * info.smallest_subnormal
    with np.errstate(invalid="ignore"):
        before = np.where((p < info.smallest_normal) | (q < info.smallest_normal),
                          GOLDEN_GRADIENT_SUBNORMAL_ROUNDINGS * half_eta, 0.0)  # fmt: skip
        after = np.where(np.abs(q - p) / temperature < info.smallest_normal, half_eta, 0.0)
        total = (rel + 2.0 * info.unit_roundoff * np.abs(q - p) + before) / temperature + after
    return np.asarray(total, np.float64)


# ------------------------------------------------------------------- upgrade gate (klparity compare)

#: ``klparity compare`` blocks an upgrade when a matrix row's headroom (tolerance / error =
#: 1 / tightness) shrinks by more than this factor. CPU kernels are deterministic, so an unchanged
#: implementation reproduces its tightness exactly; a faithful rewrite (another summation order or
#: vector width) moves an error by well under 2x, since the rounding counts of the error model stay
#: the same. 4x is two bits of the budget lost: the kernel does materially less accurate arithmetic
#: (an accumulator narrowed, a stable formula replaced), which is worth a human look before merging.
HEADROOM_SHRINK_FACTOR: Final = 4.0

#: ...unless the row still uses less than this fraction of its tolerance afterwards: a float64 error
#: going from 1e-4 to 1e-3 of its budget is a few ulps moving and leaves 1000x headroom.
HEADROOM_IGNORE_BELOW: Final = 0.01


# ----------------------------------------------------------------- a user's loss (klparity check)

#: Roundings a user's distillation loss adds to the KL kernel the table rows count (``klparity.diagnose``):
#: the product by T² and the reduction's division (the sum itself is counted by log2 n), in the compute
#: dtype. Each is relative to the result, which sum_j e_j bounds (e_j >= p_j |log p_j - log q_j|); in
#: the backward pass, relative to the gradient, which (P_k + q_k S) / T (``GradBudget.student_size``)
#: bounds per element.
USER_LOSS_ROUNDINGS: Final = 2.0


def user_loss_budget(b: Budget, compute_dtype: str) -> Budget:
    """``b`` plus ``USER_LOSS_ROUNDINGS`` roundings of ``compute_dtype`` per unit of sum_j e_j."""
    extra = USER_LOSS_ROUNDINGS * dtype_info(compute_dtype).unit_roundoff
    return replace(b, coeff_elem=b.coeff_elem + extra, reason=f"{b.reason}; + {USER_LOSS_ROUNDINGS:g} "
                   f"u_{compute_dtype} (the loss's T^2 product and reduction division)")  # fmt: skip


def user_loss_grad_budget(b: GradBudget) -> GradBudget:
    """``b`` plus ``USER_LOSS_ROUNDINGS`` backward roundings of its compute dtype on each element's size."""
    extra = USER_LOSS_ROUNDINGS * dtype_info(b.compute).unit_roundoff
    return replace(b, student_scale=np.asarray(b.student_scale + extra * b.student_size, np.float64),
                   teacher_scale=np.asarray(b.teacher_scale + extra * b.teacher_size, np.float64),
                   reason=f"{b.reason}; + {USER_LOSS_ROUNDINGS:g} u_{b.compute} (the loss's T^2 product and "
                   "reduction division)")  # fmt: skip
