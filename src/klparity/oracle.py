"""Exact float64 reference values for KL divergence, and each framework API's documented formula.

This module imports NumPy only. Every function widens its inputs to float64 *as given*: callers pass
the values a framework actually saw (logits already rounded to the tested dtype), never the decimal
originals. Two kinds of reference live here:

* the exact KL divergence, ``kl_from_logits`` / ``kl_from_log_probs`` / ``kl_from_probs``, per row
  over the last axis, with the semantics a mathematician expects (zero-probability teacher classes
  contribute 0, a class masked with ``-inf`` on both sides contributes 0, teacher mass where the
  student is ``-inf`` gives ``+inf``, NaN anywhere in a row gives NaN for that row);
* the formula each API documents, evaluated exactly in float64 (``torch_kl_div``,
  ``keras_kl_divergence``), quirks included (torch's ``0 * -inf = NaN`` on masked classes, Keras's
  clipping to ``[epsilon, 1]``), with each API's reductions and their exact 1-D / 3-D meaning.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Final, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

F64 = NDArray[np.float64]

#: Keras's documented default fuzz factor (``keras.config.epsilon()``). Pinned here on purpose: the
#: suite must notice when a Keras release changes it, so it is not read from Keras at run time.
KERAS_EPSILON: Final = 1e-7

TorchReduction = Literal["none", "sum", "mean", "batchmean"]
KerasReduction = Literal["none", "sum", "sum_over_batch_size", "mean", "mean_with_sample_weight"]
TORCH_REDUCTIONS: Final[tuple[str, ...]] = ("none", "sum", "mean", "batchmean")
KERAS_REDUCTIONS: Final[tuple[str, ...]] = (
    "none",
    "sum",
    "sum_over_batch_size",
    "mean",
    "mean_with_sample_weight",
)

# Floating dtypes NumPy does not know natively but ml_dtypes adds (the dtype names frameworks use).
_EXTRA_FLOAT_NAMES: Final = frozenset({"bfloat16", "float8_e4m3fn", "float8_e5m2"})

# psi(d) = d*e^d - expm1(d) = sum_{n>=2} (n-1) d^n / n!, used for |d| < 1 where the closed form
# cancels. Coefficients c_n = (n-1)/n! for n = 2..25; the n = 25 term is below 1e-24 at |d| = 1.
_PSI_COEFFS: Final = tuple((n - 1) / math.factorial(n) for n in range(2, 26))


def _as_float64(x: ArrayLike, name: str) -> F64:
    """Widen ``x`` to float64, refusing non-floating dtypes and scalars (a class axis is required)."""
    return _check_float(x, name).astype(np.float64)


def _check_float(x: ArrayLike, name: str) -> NDArray[np.generic]:
    """``x`` as an array of its own floating dtype; ``ValueError`` for anything else or a scalar."""
    arr = np.asarray(x)
    kind_ok = arr.dtype.kind == "f" or arr.dtype.name in _EXTRA_FLOAT_NAMES
    if not kind_ok:
        raise ValueError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64); "
            f"got dtype {arr.dtype.name}"
        )
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least one axis (the class axis); got a scalar")
    if arr.shape[-1] == 0:
        raise ValueError(f"{name} has an empty class axis (shape {arr.shape})")
    return arr


def _same_shape(a: NDArray[np.generic], b: NDArray[np.generic], names: tuple[str, str]) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"shape mismatch: {names[0]} has shape {a.shape} but {names[1]} has shape {b.shape}; "
            "broadcasting is refused on purpose (frameworks broadcast silently)"
        )


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float, or raise ``ValueError`` if it is not finite and > 0."""
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(
        temperature, (int, float, np.integer, np.floating)
    ):
        raise ValueError(f"temperature must be a real number; got {temperature!r}")
    t = float(temperature)
    if not math.isfinite(t):
        raise ValueError(f"temperature must be finite; got {t}")
    if t <= 0.0:
        raise ValueError(f"temperature must be > 0; got {t}")
    return t


def log_softmax(logits: ArrayLike, temperature: float = 1.0) -> F64:
    """float64 log-softmax of ``logits / temperature`` over the last axis (logsumexp-stable).

    ``-inf`` logits give ``-inf`` log-probabilities; a row that is all ``-inf`` or holds a NaN or
    ``+inf`` gives NaN throughout.
    """
    t = check_temperature(temperature)
    x = _as_float64(logits, "logits")
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        m = np.max(x, axis=-1, keepdims=True)
        m = np.where(np.isfinite(m), m, np.nan)  # all -inf or +inf row: no distribution
        # shift before dividing: the rounding error then scales with the spread of the logits,
        # not with their size (max(x / T) = max(x) / T for T > 0)
        shifted = (x - m) / t
        lse = np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
        return np.asarray(shifted - lse, dtype=np.float64)


def softmax(logits: ArrayLike, temperature: float = 1.0) -> F64:
    """float64 softmax of ``logits / temperature`` over the last axis (exp of ``log_softmax``)."""
    return np.exp(log_softmax(logits, temperature))


def _psi_small(d: F64) -> F64:
    """``d*exp(d) - expm1(d)`` for ``|d| < 1`` by its Taylor series (no cancellation)."""
    acc = np.full_like(d, _PSI_COEFFS[-1])
    for c in reversed(_PSI_COEFFS[:-1]):
        acc = acc * d + c
    return acc * d * d


def _kl_normalised_log(lp: F64, lq: F64) -> F64:
    """Per-row KL from *normalised* float64 log-probabilities, summed in non-negative terms.

    Uses KL = sum_j q_j * phi(p_j / q_j) with phi(r) = r log r - r + 1 >= 0, which equals
    sum p log(p/q) when both rows sum to 1. Every term is >= 0, so the sum has no cancellation and
    a normalisation error in p or q enters only at second order. A class with p_j = 0 contributes
    q_j here (balancing the -sum p + sum q bookkeeping), i.e. exactly 0 to sum p log(p/q).
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        d = lp - lq
        p = np.exp(lp)
        q = np.exp(lq)
        small = np.abs(d) < 1.0
        term_small = q * _psi_small(np.where(small, d, 0.0))
        term_large = p * (d - 1.0) + q
        term = np.where(small, term_small, term_large)
        # p_j = 0 exactly (teacher -inf), including -inf on both sides: contributes q_j (0 if both).
        term = np.where(lp == -np.inf, q, term)
        # teacher mass (even one that underflows float64) where the student is -inf: +inf.
        term = np.where((lq == -np.inf) & (lp > -np.inf), np.inf, term)
        return np.asarray(np.sum(term, axis=-1), dtype=np.float64)


#: The three float64 work buffers of one block stay within about this many bytes (cache-sized).
_BLOCK_BYTES: Final = 1 << 22
#: Arrays smaller than this (elements) are not worth handing to threads.
_THREAD_MIN_ELEMENTS: Final = 1 << 18
#: The fast form is kept for a row when its (conservative) error estimate is below this fraction of
#: the row's KL: half the 1e-13 relative accuracy the oracle promises.
_FAST_FORM_MAX_REL: Final = 5e-14
#: The fast form's rounding-error estimate is this many float64 unit roundoffs times its scale.
_FAST_FORM_ROUNDINGS: Final = 16.0


def _oracle_threads() -> int:
    """Threads for large arrays: the OpenMP cap when one is set (xdist workers set 1), else all cores."""
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, int(cap)) if cap.isdigit() else (os.cpu_count() or 1)


_THREAD_STATE = threading.local()


class _Buffers:
    """The float64 work arrays of one thread, kept between calls and reused for every block.

    Kept per thread (fresh pages would cost a page fault per 4 KiB on every call); they grow to the
    largest block seen, at most three blocks of about ``_BLOCK_BYTES`` / 3 (one row for huge rows).
    """

    def __init__(self, size: int) -> None:
        self.flat = tuple(np.empty(size) for _ in range(3))

    @staticmethod
    def of_thread(size: int) -> _Buffers:
        buf: _Buffers | None = getattr(_THREAD_STATE, "buffers", None)
        if buf is None or buf.flat[0].size < size:
            buf = _THREAD_STATE.buffers = _Buffers(size)
        return buf

    def views(self, rows: int, classes: int) -> tuple[F64, F64, F64]:
        a, b, d = (x[: rows * classes].reshape(rows, classes) for x in self.flat)
        return a, b, d


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool (threads start once, and keep their buffers)."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="klparity-oracle")


def _scale(x: F64, temp: float) -> None:
    """``x *= 1/temp`` in place: one rounding more than dividing (exact for a power of two), which
    the fast form's error estimate covers, and half the time of a division."""
    if temp != 1.0:
        np.multiply(x, 1.0 / temp, out=x)


def _kl_block(t: NDArray[np.generic], s: NDArray[np.generic], temp: float, buf: _Buffers) -> F64:
    """Per-row KL of one block of rows: a fast form where it is provably accurate, phi-form elsewhere.

    Fast form, with a = (t - max t)/T, b = (s - max s)/T, S_a = sum e^a, S_b = sum e^b:
    KL = sum e^a (a - b) / S_a - log S_a + log S_b: two exps per element, no per-element log, every
    pass in place in three buffers. It cancels when the KL is small next to its summands; the
    estimate 16 u (sum p |a - b| (1 + |a|) + |log S_a| + |log S_b| + 1) bounds its rounding error
    (sums are NumPy's pairwise ones), and rows where that exceeds 5e-14 of the KL, or where the KL or
    the estimate is not finite, are recomputed with the cancellation-free phi-form of
    ``_kl_normalised_log``. A non-finite logit always lands there: NaN or +inf makes the row NaN, a
    teacher -inf gives 0 * -inf = NaN in sum e^a (a - b), a student -inf an infinite |a - b| in the
    estimate.
    """
    a, b, d = buf.views(*t.shape)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore", under="ignore"):
        # the maximum in the input's own dtype is exact (and cheaper on the narrow input)
        for x, buf_x in ((t, a), (s, b)):
            top = x.max(axis=1, keepdims=True).astype(np.float64)
            np.copyto(buf_x, x)
            np.subtract(buf_x, top, out=buf_x)
        _scale(a, temp)
        _scale(b, temp)
        np.subtract(a, b, out=d)
        np.exp(b, out=b)
        sb = b.sum(axis=1)
        w = np.subtract(1.0, a, out=b)  # 1 + |a| (a <= 0), in b's buffer from here on
        np.exp(a, out=a)
        sa = a.sum(axis=1)
        # products in place and NumPy's pairwise sums (no BLAS: its threads would fight ours)
        ed = np.multiply(a, d, out=d)  # e^a (a - b)
        dot = ed.sum(axis=1)
        np.multiply(w, ed, out=w)  # e^a (a - b) (1 + |a|): its absolute values sum to the spread
        spread = np.abs(w, out=w).sum(axis=1)
        lsa, lsb = np.log(sa), np.log(sb)
        kl = dot / sa - lsa + lsb
        unit = np.finfo(np.float64).eps / 2
        err = _FAST_FORM_ROUNDINGS * unit * (spread / sa + np.abs(lsa) + np.abs(lsb) + 1.0)
        fast = np.isfinite(kl) & np.isfinite(err) & (err <= _FAST_FORM_MAX_REL * np.abs(kl))
    if not fast.all():
        rows = np.flatnonzero(~fast)
        kl[rows] = _kl_normalised_log(log_softmax(t[rows], temp), log_softmax(s[rows], temp))
    return np.asarray(kl, dtype=np.float64)


def kl_from_logits(
    teacher_logits: ArrayLike, student_logits: ArrayLike, temperature: float = 1.0
) -> F64:
    """Per-row KL(softmax(teacher/T) || softmax(student/T)) over the last axis, in float64.

    Returns an array of shape ``teacher_logits.shape[:-1]`` (0-d for 1-D input). The T^2 factor of
    Hinton-style distillation is *not* applied. Raises ``ValueError`` on a shape mismatch, a
    non-floating dtype or a temperature that is not finite and > 0. NaN in a row gives NaN.

    Works in blocks of rows (the float64 work buffers of a block stay cache-sized, so the peak
    memory is the inputs plus a few blocks, whatever their dtype); large inputs are split into one
    contiguous run of rows per thread (NumPy releases the GIL in its loops).
    """
    t = _check_float(teacher_logits, "teacher_logits")
    s = _check_float(student_logits, "student_logits")
    _same_shape(t, s, ("teacher_logits", "student_logits"))
    temp = check_temperature(temperature)
    c = t.shape[-1]
    t2, s2 = t.reshape(-1, c), s.reshape(-1, c)
    n_rows = t2.shape[0]
    step = max(1, min(n_rows, _BLOCK_BYTES // (3 * 8 * c)))
    out = np.empty(n_rows, dtype=np.float64)

    def work(lo: int, hi: int) -> None:
        buf = _Buffers.of_thread(min(step, hi - lo) * c)
        for start in range(lo, hi, step):
            stop = min(start + step, hi)
            out[start:stop] = _kl_block(t2[start:stop], s2[start:stop], temp, buf)

    threads = min(_oracle_threads(), n_rows) if t.size >= _THREAD_MIN_ELEMENTS else 1
    if threads > 1:
        bounds = np.linspace(0, n_rows, threads + 1).astype(int)
        list(_pool(threads).map(work, bounds[:-1], bounds[1:]))
    elif n_rows:
        work(0, n_rows)
    return out.reshape(t.shape[:-1])


def _row_has_nan(*arrays: F64) -> NDArray[np.bool_]:
    return np.asarray(np.logical_or.reduce([np.isnan(a).any(axis=-1) for a in arrays]), dtype=np.bool_)


def kl_from_log_probs(log_p: ArrayLike, log_q: ArrayLike) -> F64:
    """Per-row sum_j exp(log_p_j) * (log_p_j - log_q_j) over the last axis, no renormalisation.

    ``log_p = -inf`` contributes 0 (also where ``log_q = -inf``); finite ``log_p`` with
    ``log_q = -inf`` gives ``+inf``; NaN anywhere in a row gives NaN.
    """
    lp = _as_float64(log_p, "log_p")
    lq = _as_float64(log_q, "log_q")
    _same_shape(lp, lq, ("log_p", "log_q"))
    with np.errstate(invalid="ignore", over="ignore"):
        term = np.where(lp == -np.inf, 0.0, np.exp(lp) * (lp - lq))
        term = np.where((lq == -np.inf) & (lp > -np.inf), np.inf, term)
        rows = np.sum(term, axis=-1)
    return np.where(_row_has_nan(lp, lq), np.nan, rows)


def kl_from_probs(p: ArrayLike, q: ArrayLike) -> F64:
    """Per-row sum_j p_j log(p_j / q_j) over the last axis (``rel_entr`` semantics), no renormalisation.

    ``p_j = 0`` contributes 0 (also where ``q_j = 0``); ``p_j > 0`` with ``q_j = 0`` gives ``+inf``;
    NaN anywhere in a row gives NaN. Negative entries raise ``ValueError``.
    """
    pa = _as_float64(p, "p")
    qa = _as_float64(q, "q")
    _same_shape(pa, qa, ("p", "q"))
    if np.any(pa < 0) or np.any(qa < 0):
        raise ValueError("probabilities must be >= 0; found a negative entry in p or q")
    with np.errstate(invalid="ignore", divide="ignore"):
        term = np.where(pa == 0, 0.0, pa * (np.log(pa) - np.log(qa)))
        rows = np.sum(term, axis=-1)
    return np.where(_row_has_nan(pa, qa), np.nan, rows)


# ----------------------------------------------------------------------------------------- torch


def torch_pointwise(input: ArrayLike, target: ArrayLike, *, log_target: bool = False) -> F64:
    """torch.nn.functional.kl_div's elementwise loss, exactly, in float64.

    ``log_target=False``: ``xlogy(target, target) - target * input`` (``xlogy(0, y) = 0``), so a class
    with ``target = 0`` and ``input = -inf`` gives ``0 - 0*(-inf) = NaN`` as in torch.
    ``log_target=True``: ``exp(target) * (target - input)``; ``target = input = -inf`` gives NaN.
    """
    x = _as_float64(input, "input")
    y = _as_float64(target, "target")
    _same_shape(x, y, ("input", "target"))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if log_target:
            return np.asarray(np.exp(y) * (y - x), dtype=np.float64)
        xlogy = np.where(y == 0, 0.0, y * np.log(y))
        return np.asarray(xlogy - y * x, dtype=np.float64)


def torch_reduce(pointwise: F64, reduction: str) -> F64:
    """Apply a torch ``kl_div`` reduction to its elementwise loss.

    ``'mean'`` divides by the number of elements (B*C, not the batch); ``'batchmean'`` divides by
    ``input.size(0)``: C for 1-D input, B (not B*S) for (B, S, C) input.
    """
    if reduction not in TORCH_REDUCTIONS:
        raise ValueError(f"unknown torch reduction {reduction!r}; expected one of {TORCH_REDUCTIONS}")
    if reduction == "none":
        return pointwise
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.sum(pointwise)
    if reduction == "sum":
        return np.asarray(total)
    if reduction == "mean":
        return np.asarray(total / pointwise.size)
    if reduction == "batchmean":
        return np.asarray(total / pointwise.shape[0])
    raise ValueError(f"unknown torch reduction {reduction!r}; expected one of {TORCH_REDUCTIONS}")


def torch_kl_div(
    input: ArrayLike, target: ArrayLike, *, reduction: str = "mean", log_target: bool = False
) -> F64:
    """``torch.nn.functional.kl_div(input, target, reduction, log_target)`` evaluated exactly."""
    return torch_reduce(torch_pointwise(input, target, log_target=log_target), reduction)


# ----------------------------------------------------------------------------------------- keras


def keras_pointwise(
    y_true: ArrayLike, y_pred: ArrayLike, *, epsilon: float = KERAS_EPSILON
) -> F64:
    """Keras's elementwise KL term: both clipped to ``[epsilon, 1]``, then ``t * log(t / p)``.

    No renormalisation after clipping. ``epsilon`` should already be rounded to the compute dtype
    (see ``keras_kl_divergence``).
    """
    t = np.clip(_as_float64(y_true, "y_true"), epsilon, 1.0)
    p = np.clip(_as_float64(y_pred, "y_pred"), epsilon, 1.0)
    _same_shape(t, p, ("y_true", "y_pred"))
    return np.asarray(t * np.log(t / p), dtype=np.float64)


def keras_reduce(rows: F64, reduction: str | None) -> F64:
    """Apply a Keras 3 loss reduction (``keras.losses.Loss``) to per-row losses, unweighted.

    A scalar (from 1-D input) is returned unreduced by every reduction. ``'sum_over_batch_size'``,
    ``'mean'`` and ``'mean_with_sample_weight'`` divide by the number of rows, B*S for (B, S, C).
    """
    if reduction is not None and reduction not in KERAS_REDUCTIONS:
        raise ValueError(f"unknown Keras reduction {reduction!r}; expected one of {KERAS_REDUCTIONS}")
    if reduction is None or reduction == "none" or rows.ndim == 0:
        return rows
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.sum(rows)
    if reduction == "sum":
        return np.asarray(total)
    if reduction in ("sum_over_batch_size", "mean", "mean_with_sample_weight"):
        return np.asarray(total / rows.size if rows.size else 0.0)  # divide_no_nan
    raise ValueError(f"unknown Keras reduction {reduction!r}; expected one of {KERAS_REDUCTIONS}")


def keras_kl_divergence(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    reduction: str | None = "sum_over_batch_size",
    epsilon: float = KERAS_EPSILON,
    compute_max: float | F64 = math.inf,
) -> F64:
    """``keras.losses.KLDivergence(reduction)(y_true, y_pred)`` evaluated exactly in float64.

    ``compute_max`` is the largest finite value of the compute dtype (a scalar, or one per element):
    a ratio ``t / p`` above it overflows to ``inf`` in Keras (float16 compute: ``1 / 1e-7`` does),
    and does so here too.
    """
    t = np.clip(_as_float64(y_true, "y_true"), epsilon, 1.0)
    p = np.clip(_as_float64(y_pred, "y_pred"), epsilon, 1.0)
    _same_shape(t, p, ("y_true", "y_pred"))
    ratio = t / p
    ratio = np.where(ratio > compute_max, np.inf, ratio)
    rows = np.sum(t * np.log(ratio), axis=-1)
    return keras_reduce(np.asarray(rows, dtype=np.float64), reduction)


def keras_clip_gap_bound(p: ArrayLike, q: ArrayLike, *, epsilon: float = KERAS_EPSILON) -> F64:
    """Per-row upper bound on |Keras's clipped KL - exact KL| for normalised ``p``, ``q``.

    Clipping changes only classes with p_j < eps or q_j < eps, so by the triangle inequality the gap
    is at most sum over those classes of |t_j log(t_j / u_j)| + |p_j log(p_j / q_j)| with t, u the
    clipped values. Zero when no probability falls below eps; infinite when the exact KL is.
    """
    pa = _as_float64(p, "p")
    qa = _as_float64(q, "q")
    _same_shape(pa, qa, ("p", "q"))
    clipped = (pa < epsilon) | (qa < epsilon)
    with np.errstate(invalid="ignore", divide="ignore"):
        exact_term = np.where(pa == 0, 0.0, pa * (np.log(pa) - np.log(qa)))
    clip_term = keras_pointwise(pa, qa, epsilon=epsilon)
    bound = np.where(clipped, np.abs(clip_term) + np.abs(exact_term), 0.0)
    return np.asarray(np.sum(bound, axis=-1), dtype=np.float64)
