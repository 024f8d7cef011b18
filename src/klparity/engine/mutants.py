"""A catalogue of plausible framework regressions (mutants), each injectable by patching at run time.

Every mutant imitates a real-world bug class — precision drift, a dtype computed in lower precision,
a changed reduction, a flag ignored, NaN/inf handling, bugs that hit only some rows, sizes, layouts or
only gradients, Keras clipping changes — and is installed by replacing a framework function in the
current process. ``klparity mutate`` runs the suite once per mutant (``--klparity-mutant NAME``
installs it in the pytest controller and every xdist worker) and reports which test killed it. A
mutant that survives is a hole in the suite, to be fixed in the suite, never in the mutant. The
mutants live with their API's spec (``klparity.apis.<api>.mutants``); this module installs them.
"""

from __future__ import annotations

import importlib
from typing import Any

from klparity import apis
from klparity.apis.mutation import MUTANTS as MUTANTS
from klparity.model import Mutant

_ACTIVE: list[tuple[Any, str, Any]] = []


def install(mutant: Mutant) -> None:
    """Patch the framework in this process (idempotent per mutant target)."""
    for module_name, attr in mutant.targets:
        module = importlib.import_module(module_name)
        original = getattr(module, attr)
        _ACTIVE.append((module, attr, original))
        setattr(module, attr, mutant.wrap(original))


def uninstall() -> None:
    """Undo every installed patch, most recent first."""
    while _ACTIVE:
        module, attr, original = _ACTIVE.pop()
        setattr(module, attr, original)


apis.load_mutants()  # every spec's mutants, registered in MUTANTS (they import this module)
BY_NAME: dict[str, Mutant] = {m.name: m for m in MUTANTS}


def get(name: str) -> Mutant:
    """Mutant by name, with a clear error listing the known ones."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown mutant {name!r}; known: {', '.join(BY_NAME)}") from None
