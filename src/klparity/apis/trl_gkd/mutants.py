"""Mutants of TRL's ``GKDTrainer.generalized_jsd_loss`` (see ``klparity.engine.mutants``)."""

from __future__ import annotations

from typing import Any

from klparity.apis.mutation import register
from klparity.model import Mutant


def _beta_flipped(orig: Any) -> Any:
    """beta read as the student's weight: 0 and 1 exchange forward and reverse KL."""
    loss = orig.generalized_jsd_loss

    class GKDTrainer(orig):  # type: ignore[misc]
        @staticmethod
        def generalized_jsd_loss(student_logits: Any, teacher_logits: Any, *args: Any, beta: float = 0.5,
                                 **kwargs: Any) -> Any:  # fmt: skip
            return loss(student_logits, teacher_logits, *args, beta=1.0 - beta, **kwargs)

    return GKDTrainer


register(
    Mutant("trl_beta_flipped", "torch", "TRL's generalized_jsd_loss reads beta as the student's weight",
           (("trl.experimental.gkd", "GKDTrainer"),), _beta_flipped),
)  # fmt: skip
