"""Mutants of torchmetrics' ``kl_divergence`` (see ``klparity.engine.mutants``)."""

from __future__ import annotations

from typing import Any

from klparity.apis.mutation import register
from klparity.model import Mutant


def _mean_over_elements(orig: Any) -> Any:
    """reduction='mean' divides by every element (N·C), not by the N rows."""

    def kl_divergence(p: Any, q: Any, log_prob: bool = False, reduction: Any = "mean") -> Any:
        res = orig(p, q, log_prob=log_prob, reduction=reduction)
        return res / p.shape[-1] if reduction == "mean" else res

    return kl_divergence


register(
    Mutant("torchmetrics_mean_numel", "torch", "torchmetrics' kl_divergence 'mean' divides by N·C, not N",
           (("torchmetrics.functional", "kl_divergence"),), _mean_over_elements),
)  # fmt: skip
