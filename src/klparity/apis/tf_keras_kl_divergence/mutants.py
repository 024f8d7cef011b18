"""Mutants of tf_keras's ``KLDivergence`` (see ``klparity.engine.mutants``)."""

from __future__ import annotations

from typing import Any

from klparity.apis.mutation import register
from klparity.model import Mutant


def _float32(orig: Any) -> Any:
    """The loss computes float64 inputs in float32 (as Keras 3 does), returning float64."""

    def kl_divergence(y_true: Any, y_pred: Any) -> Any:
        import tensorflow as tf

        if y_pred.dtype == tf.float64:
            return tf.cast(orig(tf.cast(y_true, tf.float32), tf.cast(y_pred, tf.float32)), tf.float64)
        return orig(y_true, y_pred)

    return kl_divergence


register(
    Mutant("tf_keras_f64_via_f32", "tensorflow", "tf_keras's kl_divergence computes float64 in float32",
           (("tf_keras.src.losses", "kl_divergence"),), _float32),
)  # fmt: skip
