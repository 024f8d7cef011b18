"""The case grid the checker runs a loss on, and one call of the user's loss on one case (through the
framework's adapter): its value and its gradient w.r.t. the student logits, exceptions and warnings recorded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from klparity.diagnose.conventions import Convention, LossFn
from klparity.frameworks import REGISTRY
from klparity.numerics.cases import Case
from klparity.numerics.dtypes import round_to

F64 = NDArray[np.float64]


def default_cases(ndims: Sequence[int] = (2, 3)) -> list[Case]:
    """The checker's grid: small shapes (fast), distinct B, S, C and T² so that the bug factors differ.

    Families from ``klparity.cases``: Gaussian logits, a peaked teacher, a NaN logit, and (judged only
    with a masked vocabulary, see ``has_masked_classes``) classes masked with -inf in both teacher and
    student or in the teacher only.
    """
    grid = [
        Case("gauss", (4, 50), 4.0, 3.0),
        Case("gauss", (2, 3, 50), 4.0, 3.0),
        Case("gauss", (4, 50), 1.0, 3.0),
        Case("gauss", (2, 3, 50), 1.0, 3.0),
        Case("gauss", (5, 10), 0.5, 3.0),
        Case("peaked", (4, 50), 2.0, 12.0),
        Case("nan", (4, 10), 2.0),
        Case("masked", (4, 50), 2.0, 0.25),
        Case("masked", (2, 3, 50), 4.0, 0.25),
        Case("teacher_masked", (4, 50), 1.0, 0.25),
    ]
    return [c for c in grid if len(c.shape) in ndims]


def at_temperature(grid: Iterable[Case], temperature: float) -> list[Case]:
    """The cases at one fixed temperature (for a loss that does not take one), without duplicates."""
    out = {c.id: c for c in (Case(c.family, c.shape, temperature, c.param) for c in grid)}
    return list(out.values())


def has_masked_classes(case: Case) -> bool:
    """The case's logits hold ``-inf`` (masked vocabulary, zero-probability teacher classes)."""
    return case.family in ("masked", "teacher_masked", "onehot", "student_masked")


@dataclass(frozen=True)
class Observation:
    """One call of the user's loss: its value and gradient w.r.t. the student logits, widened."""

    case: Case
    dtype: str
    value: F64 | None
    value_dtype: str
    grad: F64 | None  #: d sum(loss) / d student logits; None: no gradient reached them
    warnings: tuple[str, ...] = ()
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.case.id} {self.dtype}"


def error_text(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _args(conv: Convention, student: Any, teacher: Any, temperature: float) -> list[Any]:
    by_role = {"student": student, "teacher": teacher, "temperature": temperature}
    return [by_role[r] for r in conv.inputs]


def _call(fn: LossFn, conv: Convention) -> Callable[[Any, Any, Any], Any]:
    """The user's loss as ``call(student, teacher, temperature)``, its arguments in the declared order."""

    def call(student: Any, teacher: Any, temperature: Any) -> Any:
        return fn(*_args(conv, student, teacher, temperature))

    return call


def observe(fn: LossFn, framework: str, conv: Convention, case: Case, dtype: str) -> Observation:
    """Call the loss once on ``case`` rounded to ``dtype``; exceptions are recorded, not raised."""
    t64, s64 = case.logits()
    t, s = round_to(t64, dtype), round_to(s64, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # reported as evidence, never raised into the user's code
        try:
            value, grad, vdtype = REGISTRY[framework].run_user_loss(_call(fn, conv), conv.takes, t, s, case.temperature,
                                                                    key=(fn, conv))  # fmt: skip
        except Exception as e:  # the user's code: any exception is a finding about it
            return Observation(case, dtype, None, "", None, error=error_text(e))
    msgs = tuple(dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught))
    return Observation(case, dtype, np.asarray(value, np.float64), vdtype, grad, msgs)
