"""Mutants of ``torch.distributions.kl_divergence`` (see ``klparity.engine.mutants``)."""

from __future__ import annotations

from typing import Any

from klparity.apis.mutation import register
from klparity.model import Mutant


def _reversed(orig: Any) -> Any:
    """kl_divergence(p, q) computes KL(q ‖ p): the argument order of a registered rule flipped."""

    def kl_divergence(p: Any, q: Any) -> Any:
        return orig(q, p)

    return kl_divergence


register(
    Mutant("torch_dist_reversed", "torch", "torch.distributions.kl_divergence(p, q) returns KL(q ‖ p)",
           (("torch.distributions", "kl_divergence"),), _reversed),
)  # fmt: skip
