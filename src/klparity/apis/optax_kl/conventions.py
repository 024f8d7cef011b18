"""optax's KL losses as ``klparity check`` (``klparity.diagnose``) speaks of them: how the bugs the checker
names arise with them, in JAX's words (spliced into the diagnosis texts). They reduce nothing themselves.
"""

from __future__ import annotations

from typing import Any, Final

from klparity.apis.optax_kl import OptaxKl

#: The record: a key of ``klparity.apis.SPECS``.
SEMANTICS: Final = OptaxKl.semantics
#: How the diagnosis texts name the API.
LABEL: Final = "optax"
#: The checker's reduction of the per-row KLs -> this API's reduction dividing their sum the same way.
REDUCTIONS: Final[dict[str, str]] = {}
#: A bug the checker names -> how it arises with this API.
WORDING: Final[dict[str, str]] = {
    "cross-entropy-not-kl": "optax.softmax_cross_entropy",
    "nan-masked-vocab": "optax",
    "no-gradient": "jax.lax.stop_gradient",
}
#: No formula of its own among the checker's hypotheses.
ROLES: Final[dict[str, Any]] = {}
