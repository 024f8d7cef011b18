"""Pinned facts of tf_keras's ``KLDivergence`` (legacy Keras 2, see ``klparity.engine.pinned``)."""

from __future__ import annotations

import numpy as np

from klparity.apis.keras_kl_divergence import formula as keras_formula
from klparity.apis.pinning import THREE_D, fact, logits_in
from klparity.model import Measured

#: a float64 result equals a candidate within this relative distance (the candidates differ by S = 3)
FLOAT64_CLOSE = 1e-12


@fact(
    "tf_keras.keeps_float64_and_divides_by_tokens", "tensorflow",
    "tf_keras.losses.KLDivergence() on float64 probabilities returns float64 (Keras 3's class returns float32), "
    "and its default reduction divides a (B, S, C) batch by the B·S tokens",
    "moving a distillation loss from tf.keras 2 to Keras 3 silently changes its dtype, not its divisor",
    {"dtype": "float64", "divisor": "B·S"},
    requires=("tf_keras", "tf-keras"),
)  # fmt: skip
def _float64_tokens() -> Measured:
    import tensorflow as tf
    import tf_keras

    t, s = logits_in(THREE_D)
    p, q = (tf.nn.softmax(tf.constant(x) / THREE_D.temperature, axis=-1) for x in (t, s))
    got = tf_keras.losses.KLDivergence()(p, q)
    rows = keras_formula.keras_kl_divergence(np.asarray(p), np.asarray(q), reduction="none")
    value = float(np.asarray(got))
    by_tokens, by_batch = float(np.sum(rows)) / rows.size, float(np.sum(rows)) / THREE_D.shape[0]
    divisor = f"neither (got {value!r})"
    for name, v in (("B·S", by_tokens), ("B", by_batch)):
        if abs(value - v) <= FLOAT64_CLOSE * v:
            divisor = name
    return Measured({"dtype": got.dtype.name, "divisor": divisor}, f"got {value!r}; ÷ B·S {by_tokens!r}")
