"""Pinned facts: framework behaviours a distillation user relies on, each re-measured on every run.

A ``Fact`` is a name, a framework, a one-line statement, the reason it matters, the value it was
pinned at, and a probe that measures the current behaviour (``Measured``: the comparable value and
the numbers behind it). ``check`` compares; when a release changes a fact the message names the fact,
the pinned and the new behaviour and the framework's version. Probes use deterministic data from
``Case.logits()`` only and reach frameworks through their adapters (so thread and GPU-memory settings
come first). The facts themselves live with their API's spec (``klparity.apis.<api>.facts``), each
registered with ``fact``; this module holds the engine and the helpers they share.
``python -m klparity.engine.pinned [NAME...]`` prints the current measurements.
"""

from __future__ import annotations

import sys

import numpy as np
from numpy.typing import NDArray

from klparity import apis
from klparity.apis import pinning
from klparity.frameworks import REGISTRY
from klparity.model import Fact, Measured

F64 = NDArray[np.float64]


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
        f"  repro: python -m klparity.engine.pinned {f.name}"
    )
    return ok, got, msg


# ------------------------------------------------------------------------------------- helpers


# --------------------------------------------------------------------------------------- repro


def main(argv: list[str] | None = None) -> int:
    """Print the named facts (default: all) as measured now; exit status 1 if any no longer holds."""
    from klparity.engine import pinned

    facts, probe = pinning.FACTS, pinned.check
    names = argv if argv is not None else sys.argv[1:]
    unknown = [n for n in names if n not in facts]
    if unknown:
        print(f"unknown fact {unknown[0]!r}; known: {', '.join(facts)}", file=sys.stderr)
        return 2
    failed = 0
    for f in (facts[n] for n in names or facts):
        if pinning.missing(f):
            print(f"{f.name}: skipped, {pinning.missing(f)}")
            continue
        ok, _, msg = probe(f)
        failed += not ok
        print(msg)
    return 1 if failed else 0


apis.load_facts()  # every spec's facts, registered in FACTS (they import this module's engine)

if __name__ == "__main__":
    sys.exit(main())
