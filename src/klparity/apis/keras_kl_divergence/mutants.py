"""Mutants of Keras's ``kl_divergence`` and its loss reduction: clipping changes, drift, NaN handling and
reduction bugs, each injected by patching Keras (see ``klparity.engine.mutants``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klparity.apis.mutation import register
from klparity.model import Mutant, Patch

_KERAS_FN = (("keras.src.losses.losses", "kl_divergence"), ("keras.losses", "kl_divergence"))
_KERAS_REDUCE = (("keras.src.losses.loss", "reduce_values"),)


def _keras_fn(body: Callable[[Any, Any, Any], Any]) -> Patch:
    """Replace keras's kl_divergence by ``body(ops, y_true, y_pred)`` (after dtype conversion)."""

    def wrap(orig: Any) -> Any:
        def kl_divergence(y_true: Any, y_pred: Any) -> Any:
            from keras import ops

            y_pred = ops.convert_to_tensor(y_pred)
            y_true = ops.convert_to_tensor(y_true, y_pred.dtype)
            return body(ops, y_true, y_pred)

        return kl_divergence

    return wrap


def _keras_clip(eps_true: float, eps_pred: float | None, renormalise: bool = False) -> Patch:
    def body(ops: Any, t: Any, p: Any) -> Any:
        t = ops.clip(t, eps_true, 1)
        if eps_pred is not None:
            p = ops.clip(p, eps_pred, 1)
        if renormalise:
            t = t / ops.sum(t, axis=-1, keepdims=True)
            p = p / ops.sum(p, axis=-1, keepdims=True)
        return ops.sum(t * ops.log(t / p), axis=-1)

    return _keras_fn(body)


def _keras_scaled(factor: float, dtype: str | None = None) -> Patch:
    def wrap(orig: Any) -> Any:
        def kl_divergence(y_true: Any, y_pred: Any) -> Any:
            res = orig(y_true, y_pred)
            return res * factor if dtype is None or res.dtype == dtype else res

        return kl_divergence

    return wrap


def _keras_nan_to_zero(orig: Any) -> Any:
    def kl_divergence(y_true: Any, y_pred: Any) -> Any:
        from keras import ops

        res = orig(y_true, y_pred)
        return ops.where(ops.isnan(res), ops.zeros_like(res), res)

    return kl_divergence


def _keras_reduction(mapping: Callable[[Any, Any, str], Any]) -> Patch:
    def wrap(orig: Any) -> Any:
        def reduce_values(values: Any, sample_weight: Any = None, reduction: str = "sum_over_batch_size") -> Any:
            return mapping(orig, values, reduction) if reduction not in (None, "none") else orig(
                values, sample_weight, reduction
            )

        return reduce_values

    return wrap


def _sum_over_first_axis_only(orig: Any, values: Any, reduction: str) -> Any:
    from keras import ops

    if reduction == "sum_over_batch_size" and len(values.shape) >= 2:
        return ops.sum(values) / values.shape[0]
    return orig(values, None, reduction)


def _mean_as_sum(orig: Any, values: Any, reduction: str) -> Any:
    return orig(values, None, "sum" if reduction == "sum_over_batch_size" else reduction)


register(
    Mutant("keras_epsilon_1e5", "tensorflow", "Keras's clip epsilon becomes 1e-5",
           _KERAS_FN, _keras_clip(1e-5, 1e-5)),
    Mutant("keras_no_pred_clip", "tensorflow", "y_pred no longer clipped (only y_true)",
           _KERAS_FN, _keras_clip(1e-7, None)),
    Mutant("keras_renormalise", "tensorflow", "clipped distributions renormalised to sum 1",
           _KERAS_FN, _keras_clip(1e-7, 1e-7, renormalise=True)),
    Mutant("keras_f32_drift", "tensorflow", "float32 kernel loses accuracy: result × (1 + 1e-4)",
           _KERAS_FN, _keras_scaled(1 + 1e-4, "float32")),
    Mutant("keras_nan_to_zero", "tensorflow", "NaN rows swallowed as 0",
           _KERAS_FN, _keras_nan_to_zero),
    Mutant("keras_3d_divides_by_batch", "tensorflow", "'sum_over_batch_size' on (B, S, C) divides by B only",
           _KERAS_REDUCE, _keras_reduction(_sum_over_first_axis_only)),
    Mutant("keras_default_is_sum", "tensorflow", "'sum_over_batch_size' stops dividing (acts as 'sum')",
           _KERAS_REDUCE, _keras_reduction(_mean_as_sum)),
)  # fmt: skip
