"""tf_keras (legacy Keras 2) ``tf_keras.losses.KLDivergence``: Keras's clipped formula (y_true and y_pred
clipped to [1e-7, 1], no renormalisation) with Keras 2's reductions (``AUTO`` = ``sum_over_batch_size``:
÷ rows, B·S for (B, S, C); ``sum``; ``none``), computed and returned in the input dtype: unlike Keras 3's
loss class it keeps float64 (and computes float16 in float16). The documented differences are Keras's
own (``keras.clip_epsilon``, ``keras.float16_ratio_overflow``); facts in ``facts``, mutants in ``mutants``.
"""

from __future__ import annotations

from typing import ClassVar

from klparity.apis.base import ApiSpec
from klparity.apis.keras_kl_divergence import KerasKlDivergence

ENTRY = "tf_keras.losses.KLDivergence"


class TfKerasKlDivergence(KerasKlDivergence):
    """Keras 2's loss class: Keras 3's expectations (clipping, reductions) in the input dtype, no gradient
    cells (its backward is Keras's clip and division, checked for Keras 3)."""

    semantics = "tf_keras"
    default_reduction = "sum_over_batch_size"
    facts = "klparity.apis.tf_keras_kl_divergence.facts"
    mutants = "klparity.apis.tf_keras_kl_divergence.mutants"
    #: Keras's, shared with the Keras 3 spec (the same clip): no differences of its own
    differences: ClassVar[dict[str, str]] = {}
    grad_differences: ClassVar[dict[str, str]] = {}
    grad_model = ApiSpec.grad_model
