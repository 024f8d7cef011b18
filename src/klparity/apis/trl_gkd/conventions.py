"""TRL's GKD loss as ``klparity check`` (``klparity.diagnose``) speaks of it: how a generalized JSD found in
a user's loss is named, in TRL's words (spliced into the diagnosis texts).
"""

from __future__ import annotations

from typing import Any, Final

from klparity.apis.trl_gkd import TrlGkd

#: The record: a key of ``klparity.apis.SPECS``.
SEMANTICS: Final = TrlGkd.semantics
#: How the diagnosis texts name the API.
LABEL: Final = "TRL GKD"
#: The checker's reduction of the per-row KLs -> this API's reduction dividing their sum the same way.
REDUCTIONS: Final[dict[str, str]] = {}
#: A bug the checker names -> how it arises with this API.
WORDING: Final[dict[str, str]] = {
    "jsd": "TRL GKD's generalized_jsd_loss",
}
#: No formula of its own among the checker's hypotheses.
ROLES: Final[dict[str, Any]] = {}
