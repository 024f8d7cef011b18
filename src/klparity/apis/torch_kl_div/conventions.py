"""torch's ``kl_div`` as ``klparity check`` (``klparity.diagnose``) speaks of it: the checker's reductions it
has under its own names (its ``divisor`` says what each divides by), and how the bugs the checker names
arise with it, in torch's words (spliced into the diagnosis texts).
"""

from __future__ import annotations

from typing import Any, Final

from klparity.apis.torch_kl_div import TorchKlDiv
from klparity.apis.torch_kl_div.formula import torch_pointwise

#: The record: a key of ``klparity.apis.SPECS``.
SEMANTICS: Final = TorchKlDiv.semantics
#: How the diagnosis texts name the API.
LABEL: Final = "torch"
#: The checker's reduction of the per-row KLs -> this API's reduction dividing their sum the same way.
REDUCTIONS: Final[dict[str, str]] = {"elements": "mean", "batch": "batchmean", "sum": "sum"}
#: A bug the checker names -> how it arises with this API.
WORDING: Final[dict[str, str]] = {
    "reverse-kl": "torch: kl_div(input=log teacher, target=student)",
    "cross-entropy-not-kl": "F.cross_entropy with soft targets",
    "probs-as-log-probs": "kl_div(softmax(s/T), softmax(t/T)) computes Σ p log p − Σ p·q",
    "log-probs-as-target": "log-probabilities passed as torch's target without log_target=True, or the two "
    "arguments of kl_div(log q, p) exchanged (kl_div(p, log q)): xlogy of a negative number is NaN (the two are "
    "NaN alike on every run)",
    "nan-masked-vocab": "torch kl_div",
    "no-gradient": ".detach(), torch.no_grad",
}
#: The formulas the checker's hypotheses use, by role: the log-space pointwise loss.
ROLES: Final[dict[str, Any]] = {"log_space_pointwise": torch_pointwise}
