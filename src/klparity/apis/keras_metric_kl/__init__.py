"""Keras's ``keras.metrics.KLDivergence``: the metric distillation users log beside their KD loss.

``update_state(y_true, y_pred)`` then ``result()``: a mean metric over Keras's clipped formula (y_true and
y_pred clipped to [1e-7, 1], no renormalisation), so one batch gives the row mean (÷ B, B·S for (B, S, C)),
the value of the loss class's ``sum_over_batch_size``, accumulated and returned in the metric's dtype
(``floatx()`` = float32: float64 input is computed in float32, as the loss class does). The documented
differences are Keras's own (``keras.clip_epsilon``, ``keras.float16_ratio_overflow``). The record calls the
metric itself (``call``); no gradient cells (a metric is not differentiated) and no goldens.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from klparity.apis.base import ApiSpec
from klparity.apis.keras_kl_divergence import KerasKlDivergence
from klparity.frameworks import Adapter
from klparity.frameworks.keras_adapter import tf_module
from klparity.model import Api, Output

ENTRY = "keras.metrics.KLDivergence"


def call(adapter: Adapter, api: Api, teacher: NDArray[np.generic], student: NDArray[np.generic],
         temperature: float, device: str, layout: str) -> dict[str, Output]:  # fmt: skip
    """A fresh metric, one ``update_state`` with softmax(teacher / T) and softmax(student / T) computed by
    TensorFlow in the input dtype (as the adapter feeds Keras's losses), then ``result()``."""
    if layout != "contiguous":
        raise ValueError("TensorFlow tensors have no user-visible memory layout")
    if not adapter.available():
        raise RuntimeError(adapter.missing_reason())
    tf = tf_module()  # GPU memory growth and threads set before TensorFlow's runtime starts
    import keras  # the metric is looked up at call time: a patched one (a mutant) is the one called

    dtype = str(teacher.dtype)
    with tf.device("/GPU:0" if device == "gpu" else "/CPU:0"):
        t = tf.cast(tf.constant(teacher.astype(np.float64)), dtype)
        s = tf.cast(tf.constant(student.astype(np.float64)), dtype)
        metric: Any = keras.metrics.KLDivergence()
        metric.update_state(tf.nn.softmax(t / temperature, axis=-1), tf.nn.softmax(s / temperature, axis=-1))
        res = metric.result()
    return {"default": Output(np.asarray(res.numpy()).astype(np.float64), res.dtype.name)}


class KerasMetricKl(KerasKlDivergence):
    """The metric after one batch: Keras 3's expectations for ``sum_over_batch_size`` in float32."""

    semantics = "keras_metric_kl"
    default_reduction = "sum_over_batch_size"
    facts: ClassVar[str | None] = None
    mutants = "klparity.apis.keras_metric_kl.mutants"
    #: Keras's, shared with the loss class (the same clip): no differences of its own
    differences: ClassVar[dict[str, str]] = {}
    grad_differences: ClassVar[dict[str, str]] = {}
    grad_model = ApiSpec.grad_model
    golden_expected = ApiSpec.golden_expected

    def entries(self, framework: str, dtype: str) -> tuple[Api, ...]:
        """One call per dtype on the Keras adapter, float32 and float64 only: in float16 / bfloat16 the metric
        evaluates the clipped formula in the input dtype and accumulates in float32, a split of dtypes the
        Keras record's expectations do not model yet (its cells would be judged in the wrong dtype)."""
        if framework != "tensorflow" or dtype not in ("float32", "float64"):
            return ()
        return (Api(framework, ENTRY, self.semantics, ("default",), call=call),)
