"""The tolerance table and the error model it is derived from. No tolerance literal lives elsewhere.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from klparity.dtypes import DTYPES, dtype_info

F64 = NDArray[np.float64]


@dataclass(frozen=True)
class Row:
    """One row of the tolerance table: rounding counts for one (framework, dtype)."""

    c_in: float  #: roundings per log-probability in the softmax stage, relative to e_j
    c_kernel: float  #: roundings per element in the loss kernel, relative to e_j
    accumulate: str  #: dtype the framework sums in
    reason: str


#: The table, keyed by (framework, input dtype). ``"*"`` is the default framework row.
TABLE: Final[dict[tuple[str, str], Row]] = {
    ("*", "float64"): Row(2, 3, "float64", "division, max-shift (2 per |z|, |m|) in log_softmax; "
                          "xlogy, product, difference in kl_div"),
    ("*", "float32"): Row(2, 3, "float32", "same operation count as float64, float32 roundoff"),
    ("torch", "float16"): Row(2, 3, "float32", "torch CPU rounds each elementwise op to float16 but "
                              "sums reduced-precision tensors in float32 (acc_type)"),
    ("torch", "bfloat16"): Row(2, 3, "float32", "as float16: bfloat16 elementwise, float32 sums"),
    ("tensorflow", "float16"): Row(2, 3, "float32", "softmax in float16, then KLDivergence upcasts to "
                              "floatx() = float32 by default: kernel and sum at float32"),
    ("tensorflow", "bfloat16"): Row(2, 3, "float32", "as float16: bfloat16 softmax, float32 kernel"),
}

#: Roundings per element of the float64 oracle (log_softmax: divide, shift, exp, log; phi-form: 2).
ORACLE_ROUNDINGS: Final = 6.0


def table_row(framework: str, dtype: str) -> Row:
    """The row for (framework, dtype), falling back to the framework-independent row."""
    dtype_info(dtype)
    row = TABLE.get((framework, dtype)) or TABLE.get(("*", dtype))
    if row is None:
        raise KeyError(f"no tolerance row for framework {framework!r}, dtype {dtype!r}")
    return row


@dataclass(frozen=True)
class Budget:
    """Per-element error scale and floor of one case, from which every reduction's bound follows."""

    elem_scale: F64  #: e_j, same shape as the logits
    floor: F64  #: subnormal floor per element, same shape
    coeff_elem: float  #: multiplies e_j for an elementwise (``'none'``) comparison
    u_sum: float  #: per-rounding cost of summation (accumulator u plus oracle u)
    reason: str

    def elementwise(self) -> F64:
        """Tolerance for each element of an unreduced pointwise loss."""
        return self.coeff_elem * self.elem_scale + self.floor

    def rows(self) -> F64:
        """Tolerance for each row sum (over the class axis)."""
        n = self.elem_scale.shape[-1]
        return self._summed(self.elem_scale.sum(axis=-1), self.floor.sum(axis=-1), n)

    def total(self) -> float:
        """Tolerance for the sum over every element."""
        return float(self._summed(self.elem_scale.sum(), self.floor.sum(), self.elem_scale.size))

    def _summed(self, scale: F64 | np.floating, floor: F64 | np.floating, n: int) -> F64:
        log2n = math.log2(max(n, 2))
        return np.asarray((self.coeff_elem + log2n * self.u_sum) * scale + floor, dtype=np.float64)


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
    with np.errstate(invalid="ignore", over="ignore"):
        mt = np.max(np.where(np.isfinite(zt), np.abs(zt), 0.0), axis=-1, keepdims=True)
        ms = np.max(np.where(np.isfinite(zs), np.abs(zs), 0.0), axis=-1, keepdims=True)
        log2c = math.log2(max(p.shape[-1], 2))
        lp = np.abs(log_p) if log_p is not None else _abs_log(p)
        lq = np.abs(log_q) if log_q is not None else _abs_log(q)
        # relative error of p_j itself (it is exp of a rounded z_j - m), which multiplies the
        # log-ratio of its own term: p_j * rho_j * |log p_j - log q_j|.
        rho = np.abs(zt) + mt + log2c + 1.0
        with np.errstate(invalid="ignore", divide="ignore"):
            lpv = log_p if log_p is not None else np.log(p)
            lqv = log_q if log_q is not None else np.log(q)
            log_ratio = np.abs(lpv - lqv)
        weight = lp + lq + np.abs(zt) + np.abs(zs) + mt + ms + log2c + 1.0 + rho * log_ratio
        elem = np.where((p > 0) & np.isfinite(weight), p * weight, 0.0)
        eta = d_in.smallest_subnormal
        sub_p = np.where(p < d_in.smallest_normal, 0.5 * eta * (1.0 + _abs_log(np.maximum(p, eta)) + lq), 0.0)
        sub_q = np.where(
            student_is_probability & (q < d_in.smallest_normal),
            p * 0.5 * eta / np.maximum(q, eta),
            0.0,
        )
        floor = np.where(np.isfinite(sub_p), sub_p, 0.0) + np.where(np.isfinite(sub_q), sub_q, 0.0)
    coeff = row.c_in * d_in.unit_roundoff + row.c_kernel * d_c.unit_roundoff + ORACLE_ROUNDINGS * u64
    u_sum = max(d_acc.unit_roundoff, d_c.unit_roundoff if d_c.name == "float64" else 0.0) + u64
    reason = (
        f"error model: ({row.c_in:g} u_{d_in.name} + {row.c_kernel:g} u_{d_c.name} + "
        f"{ORACLE_ROUNDINGS:g} u_float64 + log2(n) (u_{d_acc.name} + u_float64)) * sum_j e_j "
        f"+ subnormal floor; row ({framework}, {input_dtype}): {row.reason}"
    )
    return Budget(np.asarray(elem, np.float64), np.asarray(floor, np.float64), coeff, u_sum, reason)
