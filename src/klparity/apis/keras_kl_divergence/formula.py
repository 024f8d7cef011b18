"""Keras's ``KLDivergence`` / ``kl_divergence`` formula (clip to [epsilon, 1], no renormalisation) and
its reductions, evaluated exactly in float64; the bound on its clipping gap to the exact KL.

The record's exact formula (``klparity.apis.keras_kl_divergence``), shared by tf_keras and Keras's
distillation API. Built on the oracle's float64 helpers.
"""

from __future__ import annotations

import math
from typing import Final, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from klparity.numerics.oracle import _as_float64, _rel_entr_rows, _rel_entr_terms, _same_shape

F64 = NDArray[np.float64]

#: Keras's documented default fuzz factor (``keras.config.epsilon()``). Pinned here on purpose: the
#: suite must notice when a Keras release changes it, so it is not read from Keras at run time.
KERAS_EPSILON: Final = 1e-7

KerasReduction = Literal["none", "sum", "sum_over_batch_size", "mean", "mean_with_sample_weight"]
KERAS_REDUCTIONS: Final[tuple[str, ...]] = (
    "none",
    "sum",
    "sum_over_batch_size",
    "mean",
    "mean_with_sample_weight",
)


def keras_pointwise(
    y_true: ArrayLike, y_pred: ArrayLike, *, epsilon: float = KERAS_EPSILON
) -> F64:
    """Keras's elementwise KL term: both clipped to ``[epsilon, 1]``, then ``t * log(t / p)``.

    No renormalisation after clipping. ``epsilon`` should already be rounded to the compute dtype
    (see ``keras_kl_divergence``). Where ``p/2 <= t <= 2p`` the term is ``t * log1p((t - p)/p)``, the
    same value without the cancellation of ``log(t/p)`` near 1 (``_rel_entr_terms``).
    """
    t = np.clip(_as_float64(y_true, "y_true"), epsilon, 1.0)
    p = np.clip(_as_float64(y_pred, "y_pred"), epsilon, 1.0)
    _same_shape(t, p, ("y_true", "y_pred"))
    return _rel_entr_terms(t, p, t * np.log(t / p))


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
    and does so here too. Rows are summed cancellation-free where ``p/2 <= t <= 2p``
    (``_rel_entr_rows``), so near-equal clipped rows keep their relative accuracy.
    """
    t = np.clip(_as_float64(y_true, "y_true"), epsilon, 1.0)
    p = np.clip(_as_float64(y_pred, "y_pred"), epsilon, 1.0)
    _same_shape(t, p, ("y_true", "y_pred"))
    ratio = t / p
    overflow = ratio > compute_max
    ratio = np.where(overflow, np.inf, ratio)
    rows = _rel_entr_rows(t, p, t * np.log(ratio), extra_far=overflow)
    return keras_reduce(rows, reduction)


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
    exact_term = _rel_entr_terms(pa, qa, exact_term)
    clip_term = keras_pointwise(pa, qa, epsilon=epsilon)
    bound = np.where(clipped, np.abs(clip_term) + np.abs(exact_term), 0.0)
    return np.asarray(np.sum(bound, axis=-1), dtype=np.float64)
