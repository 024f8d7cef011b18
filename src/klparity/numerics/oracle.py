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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

F64 = NDArray[np.float64]


# Floating dtypes NumPy does not know natively but ml_dtypes adds (the dtype names frameworks use).
_EXTRA_FLOAT_NAMES: Final = frozenset({"bfloat16", "float8_e4m3fn", "float8_e5m2"})

# psi(d) = d*e^d - expm1(d) = sum_{n>=2} (n-1) d^n / n!, used for |d| < 1 where the closed form
# cancels. Coefficients c_n = (n-1)/n! for n = 2..25; the n = 25 term is below 1e-24 at |d| = 1.
_PSI_COEFFS: Final = tuple((n - 1) / math.factorial(n) for n in range(2, 26))

# f(d) = (1 + d) log1p(d) - d = d^2 sum_{j>=0} (-1)^j d^j / ((j + 2)(j + 1)), used for |d| <= 1/8 where
# the closed form cancels. Coefficients c_j for j = 0..17: at |d| = 1/8 the first omitted term is
# 8^-18 / 380 < 2^-61 of the leading 1/2.
_F_SERIES_MAX: Final = 0.125
_F_COEFFS: Final = tuple((-1.0) ** j / ((j + 2) * (j + 1)) for j in range(18))


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


_Kept = TypeVar("_Kept", "_Buffers", "_Work")


def _thread_kept(kind: type[_Kept], attr: str, size: int) -> _Kept:
    """This thread's ``kind`` work arrays (kept between calls under ``attr``), made anew only when
    they hold fewer than ``size`` elements."""
    kept: _Kept | None = getattr(_THREAD_STATE, attr, None)
    if kept is None or kept.capacity < size:
        kept = kind(size)
        setattr(_THREAD_STATE, attr, kept)
    return kept


class _Buffers:
    """The float64 work arrays of one thread, kept between calls and reused for every block.

    Kept per thread (fresh pages would cost a page fault per 4 KiB on every call); they grow to the
    largest block seen, at most three blocks of about ``_BLOCK_BYTES`` / 3 (one row for huge rows).
    """

    def __init__(self, size: int) -> None:
        self.flat = tuple(np.empty(size) for _ in range(3))

    @property
    def capacity(self) -> int:
        return int(self.flat[0].size)

    @staticmethod
    def of_thread(size: int) -> _Buffers:
        return _thread_kept(_Buffers, "buffers", size)

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


# ------------------------------------------------------------- p log(p/q) where p is close to q
#
# Where q/2 <= p <= 2q, p - q is exact (Sterbenz's lemma) and d = (p - q)/q, in [-1/2, 1], carries one
# rounding. There p log(p/q) = p log1p(d) (each term to a few roundings, where p (log p - log q)
# cancels: its error u p (|log p| + |log q|) is next to a term of about |p - q|), and for row sums
# p log(p/q) = q f(d) + (p - q) with f(d) = (1 + d) log1p(d) - d >= 0 (second order): for p close to
# q class by class the KL is second order while each term is first order, so even a sum of exact
# terms would cancel; the q f(d) are accurate and non-negative, the p - q exact and summed accurately.
# Every element's value depends on its own p and q only, whichever way a block is evaluated, so a
# row's KL does not depend on the other rows it is computed with.

#: The caller's elementwise formula away from p = q: its values (a fresh array, in the shape of p),
#: or a function ``far(p, q, out, scratch) -> out`` writing them for flat p, q into ``out`` (all four
#: of one size and distinct).
_FarTerms = F64 | Callable[[F64, F64, F64, F64], F64]


class _Work:
    """Float64 and bool work arrays of ``size`` elements, reused for every block (fresh arrays would
    cost a page fault per 4 KiB each time); kept per thread between calls, like ``_Buffers``."""

    def __init__(self, size: int) -> None:
        self.f = tuple(np.empty(size) for _ in range(9))
        self.b = tuple(np.empty(size, dtype=np.bool_) for _ in range(4))

    @property
    def capacity(self) -> int:
        return int(self.f[0].size)

    @staticmethod
    def of_thread(size: int) -> _Work:
        return _thread_kept(_Work, "rel_entr_work", size)


def _near_into(p: F64, q: F64, out: NDArray[np.bool_], two: F64, tmp: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """``out`` = where ``0 < q < inf``, ``p < inf`` and ``q/2 <= p <= 2q``; ``two``, ``tmp`` are scratch
    (all flat).

    Tested as ``2p >= q`` and ``2q >= p``: doubling is exact, and for finite p and q overflows to inf
    only where the inequality holds anyway. NaN is never near, nor ``p == 0`` (``2*0 >= q`` fails for
    ``q > 0``), nor an infinite p or q.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        np.greater_equal(np.add(p, p, out=two), q, out=out)
        out &= np.greater_equal(np.add(q, q, out=two), p, out=tmp)
        out &= np.greater(q, 0.0, out=tmp)
        out &= np.less(q, np.inf, out=tmp)
        out &= np.less(p, np.inf, out=tmp)
    return out


def _f_series_into(d: F64, out: F64) -> None:
    """``out`` = d^2 sum_{j<=17} c_j d^j by Horner (``_F_COEFFS``); 0 where d == 0."""
    out.fill(_F_COEFFS[-1])
    for c in reversed(_F_COEFFS[:-1]):
        np.multiply(out, d, out=out)
        np.add(out, c, out=out)
    np.multiply(out, d, out=out)
    np.multiply(out, d, out=out)


def _f_closed_into(d: F64, out: F64, lg: F64) -> None:
    """``out`` = (L - d) + d L with L = log1p(d) (``lg`` is scratch); 0 where d == 0."""
    np.log1p(d, out=lg)
    np.subtract(lg, d, out=out)
    np.multiply(lg, d, out=lg)
    np.add(out, lg, out=out)


def _f_near_into(d: F64, out: F64, work: _Work) -> F64:
    """``out`` = f(d) = (1 + d) log1p(d) - d >= 0 for ``d`` in [-1/2, 1] (flat), to a few roundings.

    f is second order (about d^2/2), so the closed form loses all digits for small d. For
    ``|d| <= 1/8`` the alternating series d^2 (1/2 - d/6 + d^2/12 - ...) to degree 17 is summed by
    Horner: its terms shrink by at least 8x (no cancellation: about 4 roundings relative to f,
    counting d's own; truncation below 2^-60 of f). For ``1/8 < |d| <= 1``, ``f = (L - d) + d L``
    with ``L = log1p(d)``: ``L - d`` is exact by Sterbenz (d/2 <= L <= 2d on [-1/2, 1]), so only
    log1p's error, weighted by (1 + d)|L| / f <= 18, is amplified: at most about 40 roundings
    relative to f (18 measured). Where both kinds occur, each form gets its own d and 0 for the
    others (both forms give exactly 0 at 0) and the two results are added: no masked writes, whose
    cost on an unpredictable mask is several times that of the arithmetic.
    """
    n = d.size
    small = np.less_equal(np.abs(d, out=out), _F_SERIES_MAX, out=work.b[0][:n])
    n_small = np.count_nonzero(small)
    if n_small == n:
        _f_series_into(d, out)
    elif n_small == 0:
        _f_closed_into(d, out, work.f[5][:n])
    else:
        part, lg = work.f[5][:n], work.f[6][:n]
        _f_series_into(np.multiply(d, small, out=part), out)
        np.multiply(d, np.logical_not(small, out=work.b[1][:n]), out=part)
        _f_closed_into(part, lg, work.f[7][:n])
        np.add(out, lg, out=out)
    return out


def _accurate_row_sum(x: F64, work: F64) -> F64:
    """Row sums over the last axis of a 2-D array of *finite* values, nearly correctly rounded;
    ``x`` is overwritten, ``work`` is scratch of ``x``'s shape.

    Two extractions (Rump, Ogita and Oishi, "Accurate floating-point summation", SIAM J. Sci. Comput.
    31, 2008, Lemma 3.3): with sigma = 2^(M + e), 2^M >= n + 2 and 2^e > max |x|, every
    ``hi = (x + sigma) - sigma`` is a multiple of u sigma and so are all partial sums of the hi,
    which stay below sigma: ``sum(hi)`` is exact in any order, and ``x - hi`` (|x - hi| <= u sigma)
    is exact too. Extracting twice leaves remainders below about 4 (n + 2)^2 u^2 max |x|, summed in
    plain float64: the result is within one rounding of the exact sum plus about 2^9 n^3 u^3 max |x|.
    """
    shift = math.ceil(math.log2(x.shape[-1] + 2))
    plain = np.sum(x, axis=-1)
    parts = []
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(2):
            _, e = np.frexp(np.max(np.abs(x, out=work), axis=-1, keepdims=True))
            sigma = np.ldexp(1.0, e + shift)
            hi = np.subtract(np.add(x, sigma, out=work), sigma, out=work)
            np.subtract(x, hi, out=x)
            parts.append(np.sum(hi, axis=-1))
        total = parts[0] + (parts[1] + np.sum(x, axis=-1))
    # sigma overflows only for |x| near float64's largest values: the plain sum is all there is then
    return np.asarray(np.where(np.isfinite(total), total, plain), dtype=np.float64)


def _far_values(far: _FarTerms, p: F64, q: F64, sel: NDArray[np.bool_] | None, bufs: tuple[F64, ...]) -> F64:
    """The caller's far-form values on the classes of ``sel`` (flat; ``None``: all), in ``bufs[0]``
    (``far`` an array: a view of it when ``sel`` is None); ``bufs`` are four distinct work arrays."""
    if isinstance(far, np.ndarray):
        flat = far.reshape(-1)
        return flat if sel is None else np.compress(sel, flat, out=bufs[0])
    if sel is None:
        return far(p, q, bufs[0], bufs[1])
    return far(np.compress(sel, p, out=bufs[2]), np.compress(sel, q, out=bufs[3]), bufs[0], bufs[1])


def _rel_entr_rows_into(p: F64, q: F64, near: NDArray[np.bool_], far: _FarTerms, work: _Work) -> F64:
    """Row sums over the last axis of ``p log(p/q)`` for 2-D C-contiguous ``p``, ``q``.

    ``far`` gives the caller's elementwise formula, used off ``near`` (``_near_into``); on ``near``
    classes the term is q f(d) and the p - q are summed apart: with NumPy's pairwise sum where its
    error bound, (24 + log2 n) u sum |p - q| (at most 16 roundings in a block of 128, then one per
    halving), is below u |row|, else by ``_accurate_row_sum``. The row's error is then a few
    roundings of sum_j |t_j| (t_j: q f(d) on near classes, the far formula elsewhere) plus one of
    the row: a few roundings relative to the row wherever the t_j do not cancel (among themselves or
    against sum (p - q)); on a row of near classes only, the t_j are >= 0. The terms are evaluated
    three ways (every class near; mostly near: the near formula on all classes, far ones replaced by
    p = q = 1, and the far formula on the far classes only; mostly far: the far formula on all
    classes, the near one on the near classes only), each giving the same value for every class.
    """
    shape, n = p.shape, p.size
    pf, qf, nf = p.reshape(-1), q.reshape(-1), near.reshape(-1)
    k = np.count_nonzero(nf)
    with np.errstate(invalid="ignore", over="ignore", under="ignore", divide="ignore"):
        if k == 0:
            values = _far_values(far, pf, qf, None, (work.f[3][:n], work.f[8][:n]))
            return np.asarray(np.sum(values.reshape(shape), axis=-1))
        if 2 * k >= n:  # the near formula on every class
            if k < n:
                far_mask = np.logical_not(nf, out=work.b[2][:n])
                pn, qn = work.f[0][:n], work.f[1][:n]
                np.copyto(pn, pf)
                np.copyto(qn, qf)
                np.copyto(pn, 1.0, where=far_mask)  # d = 0, p - q = 0 there
                np.copyto(qn, 1.0, where=far_mask)
            else:
                pn, qn = pf, qf
            lin = np.subtract(pn, qn, out=work.f[2][:n])
            term = _f_near_into(np.divide(lin, qn, out=work.f[4][:n]), work.f[3][:n], work)
            np.multiply(term, qn, out=term)
            if k < n:
                bufs = tuple(work.f[i][: n - k] for i in (5, 6, 7, 8))
                np.place(term, far_mask, _far_values(far, pf, qf, far_mask, bufs))
        else:  # the far formula on every class, the near one on the near classes
            term = _far_values(far, pf, qf, None, (work.f[3][:n], work.f[8][:n]))
            pn = np.compress(nf, pf, out=work.f[0][:k])
            qn = np.compress(nf, qf, out=work.f[1][:k])
            diff = np.subtract(pn, qn, out=work.f[2][:k])
            fd = _f_near_into(np.divide(diff, qn, out=work.f[4][:k]), work.f[0][:k], work)
            np.place(term, nf, np.multiply(fd, qn, out=fd))
            lin = work.f[8][:n]
            lin.fill(0.0)
            np.place(lin, nf, diff)
        term2, lin2, scratch = term.reshape(shape), lin.reshape(shape), work.f[4][:n].reshape(shape)
        rows = np.sum(term2, axis=-1)
        lin_rows = np.sum(lin2, axis=-1)
        slack = (24 + math.log2(shape[-1])) * np.sum(np.abs(lin2, out=scratch), axis=-1)
        redo = ~(slack <= np.abs(rows + lin_rows))
        if redo.all():
            lin_rows = _accurate_row_sum(lin2, scratch)
        elif redo.any():
            lin_rows[redo] = _accurate_row_sum(lin2[redo], scratch[: np.count_nonzero(redo)])
        return np.asarray(rows + lin_rows, dtype=np.float64)


#: ``_rel_entr_rows`` works in blocks of rows of about this many elements (cache-sized work arrays).
_REL_ENTR_BLOCK_ELEMENTS: Final = 1 << 15


def _rel_entr_rows(p: F64, q: F64, far: _FarTerms, extra_far: NDArray[np.bool_] | None = None) -> F64:
    """``_rel_entr_rows_into`` on arrays of any shape (rows over the last axis), in cache-sized blocks
    of rows with reused work arrays; classes of ``extra_far`` keep the far formula."""
    c = p.shape[-1]
    p2, q2 = (np.ascontiguousarray(x).reshape(-1, c) for x in (p, q))
    if isinstance(far, np.ndarray):
        far = np.ascontiguousarray(far).reshape(p2.shape)
    keep_far = None if extra_far is None else np.broadcast_to(extra_far, p.shape).reshape(p2.shape)
    n_rows = p2.shape[0]
    step = max(1, min(n_rows, _REL_ENTR_BLOCK_ELEMENTS // c))
    work = _Work.of_thread(step * c)
    near_buf = work.b[3]
    rows = np.empty(n_rows)
    for lo in range(0, n_rows, step):
        pb, qb = p2[lo : lo + step], q2[lo : lo + step]
        n = pb.size
        near = _near_into(pb.reshape(-1), qb.reshape(-1), near_buf[:n], work.f[0][:n], work.b[1][:n])
        if keep_far is not None:
            near &= ~keep_far[lo : lo + step].reshape(-1)
        far_b = far[lo : lo + step] if isinstance(far, np.ndarray) else far
        rows[lo : lo + step] = _rel_entr_rows_into(pb, qb, near.reshape(pb.shape), far_b, work)
    return rows.reshape(p.shape[:-1])


def _rel_entr_terms(p: F64, q: F64, term: F64) -> F64:
    """Elementwise ``p log(p/q)``: ``term`` (the caller's formula, a fresh array, overwritten and
    returned) except where ``q/2 <= p <= 2q``, where ``p * log1p((p - q)/q)`` is used: p - q is
    exact there and log1p of a small argument is well conditioned, so each term is within a few
    roundings of the exact value (the caller's two-log or log-of-ratio form cancels near p = q)."""
    two, tmp = np.empty(p.size), np.empty(p.size, dtype=np.bool_)
    near = _near_into(p.reshape(-1), q.reshape(-1), np.empty(p.size, dtype=np.bool_), two, tmp).reshape(p.shape)
    if near.any():
        pn, qn = p[near], q[near]
        with np.errstate(under="ignore"):
            term[near] = pn * np.log1p((pn - qn) / qn)
    return term


def _probs_far(p: F64, q: F64, out: F64, scratch: F64) -> F64:
    """``kl_from_probs``'s formula off p = q: ``p (log p - log q)``, 0 where ``p == 0``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        np.subtract(np.log(p, out=out), np.log(q, out=scratch), out=out)
        np.multiply(out, p, out=out)
        np.copyto(out, 0.0, where=p == 0)
    return out


def kl_from_probs(p: ArrayLike, q: ArrayLike) -> F64:
    """Per-row sum_j p_j log(p_j / q_j) over the last axis (``rel_entr`` semantics), no renormalisation.

    ``p_j = 0`` contributes 0 (also where ``q_j = 0``); ``p_j > 0`` with ``q_j = 0`` gives ``+inf``;
    NaN anywhere in a row gives NaN. Negative entries raise ``ValueError``. Where ``q/2 <= p <= 2q``
    the row is summed cancellation-free (``_rel_entr_rows_into``): rows with p close to q class by
    class (a KL of second order) keep a relative accuracy of a few roundings; elsewhere the term is
    ``p (log p - log q)``. Works in cache-sized blocks of rows, in reused work arrays; a row's value
    does not depend on the rows computed with it.
    """
    pa = _as_float64(p, "p")
    qa = _as_float64(q, "q")
    _same_shape(pa, qa, ("p", "q"))
    if np.any(pa < 0) or np.any(qa < 0):
        raise ValueError("probabilities must be >= 0; found a negative entry in p or q")
    rows = _rel_entr_rows(pa, qa, _probs_far)
    return np.where(_row_has_nan(pa, qa), np.nan, rows)


# ----------------------------------------------------------------------------------------- torch


def log_mixture(log_p: ArrayLike, log_q: ArrayLike, beta: float) -> F64:
    """log(beta · p + (1 − beta) · q) elementwise, from the log-probabilities (log-sum-exp: no underflow), as
    the generalized Jensen–Shannon divergence of GKD mixes teacher p and student q; 0 < beta < 1."""
    lp, lq = _as_float64(log_p, "log_p"), _as_float64(log_q, "log_q")
    with np.errstate(invalid="ignore"):
        return np.asarray(np.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq), np.float64)
