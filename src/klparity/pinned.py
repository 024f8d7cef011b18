"""Pinned facts: framework behaviours a distillation user relies on, each re-measured on every run.

A ``Fact`` is a name, a framework, a one-line statement, the reason it matters, the value it was
pinned at, and a probe that measures the current behaviour (``Measured``: the comparable value and
the numbers behind it). ``check`` compares; when a release changes a fact the message names the fact,
the pinned and the new behaviour and the framework's version. Probes use deterministic data from
``Case.logits()`` only and reach frameworks through their adapters (so thread and GPU-memory settings
come first). The facts themselves live with their API's spec (``klparity.apis.<api>.facts``), each
registered with ``fact``; this module holds the engine and the helpers they share.
``python -m klparity.pinned [NAME...]`` prints the current measurements.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from klparity import apis
from klparity.cases import Case
from klparity.dtypes import round_to, widen
from klparity.frameworks import REGISTRY
from klparity.frameworks.base import installed
from klparity.tolerances import same_sum

F64 = NDArray[np.float64]
#: A pinned value: plain data (str, bool, float, or a dict of them) that compares with ``==``.
Value = Any


@dataclass(frozen=True)
class Measured:
    """What a probe saw: ``value`` is compared with the pinned one; ``detail`` holds the numbers."""

    value: Value
    detail: str


@dataclass(frozen=True)
class Fact:
    """One pinned behaviour of one framework."""

    name: str
    framework: str  #: registry name
    statement: str
    reason: str
    pinned: Value
    probe: Callable[[], Measured]
    #: (module, extra) of a library the fact needs beyond its framework, or ("", "")
    requires: tuple[str, str] = ("", "")

    def missing(self) -> str | None:
        """Why the fact cannot be measured here (its framework or library is absent), or None."""
        adapter = REGISTRY[self.framework]
        if not adapter.available():
            return adapter.missing_reason()
        module, extra = self.requires
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


def version(framework: str) -> str:
    """The framework's version as reported (its adapter's ``version_label``: Keras's for TensorFlow)."""
    return REGISTRY[framework].version_label()


def check(f: Fact) -> tuple[bool, Measured, str]:
    """Probe ``f``; return (still holds, measurement, standalone message)."""
    got = f.probe()
    ok = got.value == f.pinned
    verdict = "holds" if ok else "NO LONGER HOLDS"
    msg = (
        f"pinned fact {f.name!r} {verdict} on {version(f.framework)}: {f.statement}\n"
        f"  pinned: {f.pinned!r}\n"
        f"  now:    {got.value!r}\n"
        f"  measured: {got.detail}\n"
        f"  why it matters: {f.reason}\n"
        f"  repro: python -m klparity.pinned {f.name}"
    )
    return ok, got, msg


# ------------------------------------------------------------------------------------- helpers


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


# --------------------------------------------------------------------------------------- repro


def main(argv: list[str] | None = None) -> int:
    """Print the named facts (default: all) as measured now; exit status 1 if any no longer holds."""
    from klparity import pinned  # the registry the facts fill: under ``python -m`` this module is __main__

    facts, probe = pinned.FACTS, pinned.check
    names = argv if argv is not None else sys.argv[1:]
    unknown = [n for n in names if n not in facts]
    if unknown:
        print(f"unknown fact {unknown[0]!r}; known: {', '.join(facts)}", file=sys.stderr)
        return 2
    failed = 0
    for f in (facts[n] for n in names or facts):
        if f.missing():
            print(f"{f.name}: skipped, {f.missing()}")
            continue
        ok, _, msg = probe(f)
        failed += not ok
        print(msg)
    return 1 if failed else 0


apis.load_facts()  # every spec's facts, registered in FACTS (they import this module's engine)

if __name__ == "__main__":
    sys.exit(main())
