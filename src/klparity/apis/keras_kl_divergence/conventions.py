"""Keras's ``KLDivergence`` as ``klparity check`` (``klparity.diagnose``) speaks of it: the checker's
reductions it has under its own names (its ``divisor``, on its per-row output, says what each divides by),
and how the bugs the checker names arise with it, in Keras's words (spliced into the diagnosis texts).
"""

from __future__ import annotations

from typing import Any, Final

from klparity.apis.keras_kl_divergence import KerasKlDivergence, keras_grads
from klparity.apis.keras_kl_divergence.formula import KERAS_EPSILON, keras_kl_divergence

#: The record: a key of ``klparity.apis.SPECS``.
SEMANTICS: Final = KerasKlDivergence.semantics
#: How the diagnosis texts name the API.
LABEL: Final = "Keras"
#: The checker's reduction of the per-row KLs -> this API's reduction dividing their sum the same way.
REDUCTIONS: Final[dict[str, str]] = {"mean": "sum_over_batch_size"}
#: A bug the checker names -> how it arises with this API.
WORDING: Final[dict[str, str]] = {
    "reverse-kl": "Keras: y_true and y_pred exchanged",
    "cross-entropy-not-kl": "categorical_crossentropy",
    "log-probs-as-probs": "Keras KLDivergence",
    "logits-as-probs": "Keras KLDivergence",
    "no-gradient": "tf.stop_gradient",
}
#: The formulas the checker's hypotheses use, by role: the clipped per-row KL, its epsilon, its gradients.
ROLES: Final[dict[str, Any]] = {"clipped_rows": keras_kl_divergence, "clip_epsilon": KERAS_EPSILON,
                                "clipped_grads": keras_grads}
