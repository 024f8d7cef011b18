"""The registry of pinned facts and the helpers their probes share.

Each API's record registers its facts (``klparity.apis.<api>.facts``) with ``fact``; the engine
(``klparity.engine.pinned``) measures and compares them. Probes use deterministic data from
``Case.logits()`` only (``logits_in`` and the shared cases below) and reach frameworks through their
adapters, so thread and GPU-memory settings come first.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from numpy.typing import NDArray

from klparity.frameworks import REGISTRY
from klparity.model import Fact, Measured, Value, installed
from klparity.numerics.cases import Case
from klparity.numerics.dtypes import round_to, widen
from klparity.numerics.errormodel import same_sum

F64 = NDArray[np.float64]


def missing(f: Fact) -> str | None:
    """Why the fact cannot be measured here (its framework or library is absent), or None."""
    adapter = REGISTRY[f.framework]
    if not adapter.available():
        return adapter.missing_reason()
    module, extra = f.requires
    if module and not installed(module):
        return f"{module} is not installed: pip install 'klparity[{extra}]'"
    return None


FACTS: dict[str, Fact] = {}


Probe = Callable[[], Measured]


def fact(name: str, framework: str, statement: str, reason: str, pinned: Value,
         requires: tuple[str, str] = ("", "")) -> Callable[[Probe], Probe]:  # fmt: skip
    """Register the decorated probe as the fact ``name`` (``requires``: (module, extra) it needs)."""

    def register(probe: Probe) -> Probe:
        if name in FACTS:
            raise ValueError(f"pinned fact {name!r} registered twice")
        FACTS[name] = Fact(name, framework, statement, reason, pinned, probe, requires)
        return probe

    return register


def logits_in(case: Case, dtype: str = "float64") -> tuple[F64, F64]:
    """The case's logits rounded to ``dtype`` (as float64 arrays holding those values)."""
    t, s = case.logits()
    return widen(round_to(t, dtype)), widen(round_to(s, dtype))


def to_np(x: Any) -> F64:
    """A framework tensor as a float64 NumPy array."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double()
    return np.asarray(np.asarray(x).astype(np.float64), np.float64)


def which(observed: float, candidates: dict[str, tuple[float, float]], terms_abs_sum: float, n: int) -> str:
    """The candidate (name -> (value, divisor)) equal to ``observed`` within the float64 rounding of
    the sum; 'none of ...' when none is, so that a new behaviour cannot pass as an old one."""
    hits = [name for name, (value, div) in candidates.items()
            if abs(observed - value) <= same_sum("float64", n, terms_abs_sum) / div]  # fmt: skip
    if len(hits) == 1:
        return hits[0]
    return f"none of {sorted(candidates)} (observed {observed:.17g})" if not hits else f"ambiguous {sorted(hits)}"


def kind(x: float) -> str:
    return "nan" if math.isnan(x) else ("+inf" if x == math.inf else ("-inf" if x == -math.inf else "finite"))


@contextmanager
def recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning raised inside (the probe reports them; none escapes to pytest)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


SMALL = Case("gauss", (4, 10), 1.0, 3.0)


ONE_D = Case("gauss", (10,), 1.0, 3.0)


THREE_D = Case("gauss", (2, 3, 10), 1.0, 3.0)


MASKED = Case("masked", (4, 10), 1.0, 0.25)


TEACHER_MASKED = Case("teacher_masked", (4, 10), 1.0, 0.25)


STUDENT_MASKED = Case("student_masked", (4, 10), 1.0)


IDENTICAL = Case("identical", (8, 1000), 1.0, 3.0)


HOT = Case("gauss", (8, 1000), 1000.0, 3.0)


NAN = Case("nan", (4, 10), 1.0)


WIDE = {t: Case("gauss", (8, 1000), t, 3.0) for t in (0.5, 1.0, 2.0, 5.0, 10.0)}
