"""What the checker takes from the API records: the reductions it names, each one record's own reduction
(whose ``divisor`` it divides by), and the frameworks' wording of each bug it names.

The checker holds no reduction table and no framework's words of its own: each record that has something
to say keeps it in its ``conventions`` module (``klparity.apis.<record>.conventions``), read here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from klparity.apis import SPECS, ApiSpec
from klparity.frameworks import REGISTRY, runs_user_losses
from klparity.numerics.errormodel import Budget

F64 = NDArray[np.float64]


@dataclass(frozen=True)
class Record:
    """One record's data for the checker (its ``conventions`` module)."""

    spec: ApiSpec
    label: str  #: how the diagnosis texts name the API
    reductions: dict[str, str]  #: checker reduction -> the API's own reduction label
    wording: dict[str, str]  #: bug name -> how it arises with the API
    roles: dict[str, Any]  #: formulas the hypotheses use, by role


def _records() -> tuple[Record, ...]:
    """Every record that declares its ``conventions`` (in registry order, the order of a diagnosis's words)."""
    out = []
    for spec in SPECS.values():
        module = spec.own("conventions")
        if module:
            c = importlib.import_module(module)
            out.append(Record(spec, c.LABEL, c.REDUCTIONS, c.WORDING, c.ROLES))
    return tuple(out)


#: In the order their words appear in a diagnosis.
RECORDS: Final = _records()


def role(name: str) -> Any:
    """The formula (or constant) a record provides for the role ``name``."""
    for r in RECORDS:
        if name in r.roles:
            return r.roles[name]
    raise LookupError(f"no API record provides {name!r}")

#: Frameworks whose adapter runs a user's loss (``Adapter.run_user_loss``).
FRAMEWORKS: Final = runs_user_losses()
#: Module prefixes an import of which names the framework a loss file uses (each adapter's ``import_names``).
IMPORT_FRAMEWORK: Final = {m: name for name in FRAMEWORKS for m in REGISTRY[name].import_names}
#: The frameworks by the modules that name them, for messages (one entry per framework).
FRAMEWORK_IMPORTS: Final = ", ".join("/".join(REGISTRY[name].import_names or (name,)) for name in FRAMEWORKS)


def wording(bug: str, sep: str) -> str:
    """How the records' APIs produce ``bug``, joined by ``sep`` (empty when none says)."""
    return sep.join(r.wording[bug] for r in RECORDS if bug in r.wording)


def _source(reduction: str) -> tuple[Record, str]:
    for r in RECORDS:
        if reduction in r.reductions:
            return r, r.reductions[reduction]
    raise ValueError(f"no API record has the reduction {reduction!r}")


def api_reduction(reduction: str) -> str:
    """The API reduction that is the checker's ``reduction``, as a call names it (``<api> reduction='<name>'``)."""
    record, name = _source(reduction)
    return f"{record.label} reduction={name!r}"


def api_reduction_name(reduction: str) -> str:
    """The API reduction that is the checker's ``reduction``, in short (``<api> '<name>'``)."""
    record, name = _source(reduction)
    return f"{record.label} {name!r}"


def fixed_divisor(reduction: str) -> float | None:
    """The constant of a ``fixed:D`` reduction (the sum divided by D whatever the shape), else None."""
    return float(reduction.removeprefix("fixed:")) if reduction.startswith("fixed:") else None


def divisor(reduction: str, shape: tuple[int, ...]) -> float:
    """What ``reduction`` divides the sum of per-row values by, on logits of ``shape``: the record's ``divisor``
    on its own unreduced output (per class or per row); 1 for ``per-token`` (nothing is divided)."""
    fixed = fixed_divisor(reduction)
    if fixed is not None:
        return fixed
    if reduction == "per-token":
        return 1
    record, name = _source(reduction)
    spec = record.spec
    return spec.divisor(spec.resolve(name), shape if spec.none_is_elementwise else shape[:-1])


def reduce(rows: F64, bud: Budget, reduction: str, shape: tuple[int, ...]) -> tuple[F64, F64]:
    """(value, tolerance) of a reduction of per-row values."""
    if reduction == "per-token":
        return rows, bud.rows()
    div = divisor(reduction, shape)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(np.sum(rows) / div), np.asarray(bud.total() / div)
