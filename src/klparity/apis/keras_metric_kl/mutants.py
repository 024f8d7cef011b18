"""Mutants of ``keras.metrics.KLDivergence`` (see ``klparity.engine.mutants``)."""

from __future__ import annotations

from typing import Any

from klparity.apis.mutation import register
from klparity.model import Mutant


def _drifted_result(original: Any) -> Any:
    """The metric class with ``result()`` 1e-4 relative high: a float32 accumulation drift."""

    class Drifted(original):  # type: ignore[misc]
        def result(self) -> Any:
            return super().result() * (1.0 + 1e-4)

    return Drifted


register(
    Mutant("keras.metric_result_drift_1e-4", "tensorflow",
           "keras.metrics.KLDivergence.result() 1e-4 relative high (a drifting accumulator)",
           (("keras.metrics", "KLDivergence"),), _drifted_result),
)  # fmt: skip
