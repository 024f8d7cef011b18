"""The registry of mutants: each API's record registers its injectable regressions here.

``klparity.apis.<api>.mutants`` calls ``register``; the engine (``klparity.engine.mutants``) installs
them and ``klparity mutate`` runs the suite once per mutant.
"""

from __future__ import annotations

from klparity.model import Mutant

#: every spec's mutants, in registry order (``register``, called by ``klparity.apis.<api>.mutants``)
MUTANTS: list[Mutant] = []


def register(*mutants: Mutant) -> None:
    """Add mutants to the catalogue (each name once)."""
    known = {m.name for m in MUTANTS}
    for m in mutants:
        if m.name in known:
            raise ValueError(f"mutant {m.name!r} registered twice")
        known.add(m.name)
        MUTANTS.append(m)
