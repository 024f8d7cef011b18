"""Mutants of Keras 3's ``LogitsDistillation`` (see ``klparity.engine.mutants``)."""

from __future__ import annotations

from typing import Any

from klparity.apis.mutation import register
from klparity.model import Mutant


def _t2_dropped(orig: Any) -> Any:
    """The KL branch forgets its T² factor."""

    class LogitsDistillation(orig):  # type: ignore[misc]
        def compute_loss(self, teacher_outputs: Any, student_outputs: Any, **kwargs: Any) -> Any:
            return super().compute_loss(teacher_outputs, student_outputs, **kwargs) / self.temperature**2

    return LogitsDistillation


register(
    Mutant("keras_distillation_no_t2", "tensorflow", "LogitsDistillation drops its T² factor",
           (("keras.distillation", "LogitsDistillation"),), _t2_dropped),
)  # fmt: skip
