"""Mutants of ``torch.distributions.kl_divergence`` (see ``klparity.mutants``)."""

from __future__ import annotations

from typing import Any

from klparity.mutants import Mutant, register


def _reversed(orig: Any) -> Any:
    """kl_divergence(p, q) computes KL(q ‖ p): the argument order of a registered rule flipped."""

    def kl_divergence(p: Any, q: Any) -> Any:
        return orig(q, p)

    return kl_divergence


register(
    Mutant("torch_dist_reversed", "torch", "torch.distributions.kl_divergence(p, q) returns KL(q ‖ p)",
           (("torch.distributions", "kl_divergence"),), _reversed),
)  # fmt: skip
