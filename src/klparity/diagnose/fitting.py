"""Hypotheses with a parameter solved for on one run: the constant a sum over rows is divided by (a
hard-coded batch size), and the beta of a generalized JSD; the diagnosis keeps those every run agrees with.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Final

import numpy as np
from numpy.typing import NDArray

from klparity.diagnose.catalogue import POWERS, Fitted
from klparity.diagnose.conventions import Convention, jsd_name
from klparity.diagnose.observe import has_masked_classes
from klparity.diagnose.prediction import Prepared
from klparity.diagnose.records import divisor

F64 = NDArray[np.float64]

#: The standard divisors and powers of T a fitted parameter is combined with.
_FIT_REDUCTIONS: Final = ("mean", "batch", "sum", "elements")
#: Where a JSD's beta is searched: a grid on (0, 1), refined between sign changes by Brent's method.
_BETA_GRID: Final = np.linspace(0.0, 1.0, 201)[1:-1]


def _fit_runs(preps: list[Prepared]) -> list[Prepared]:
    """Runs a parameter is fitted on: float64, finite nonzero value, no masked class or NaN logit; (B, S, C) first
    (there B, B·S and C differ)."""
    runs = [
        p
        for p in preps
        if p.obs.dtype == "float64"
        and p.obs.value is not None
        and not has_masked_classes(p.obs.case)
        and not np.isnan(p.ex.rows).any()
        and np.all(np.isfinite(p.obs.value))
        and np.all(p.obs.value)
    ]
    return sorted(runs, key=lambda p: (p.compute != "float64", -len(p.shape)))


def fit_parameters(preps: list[Prepared], conv: Convention) -> list[Fitted]:
    """Hypotheses with a parameter solved for on one run: the constant D a sum over rows is divided by (of the
    declared formula and the forward KL), and the beta of a generalized JSD, for each power of T (and each
    standard reduction, for beta). ``diagnose`` keeps those that reproduce every run."""
    runs = _fit_runs(preps)
    if not runs:
        return []
    p = runs[0]
    value, temp = np.asarray(p.obs.value, np.float64), p.ex.temperature
    out: list[Fitted] = []
    if value.ndim == 0:
        standard = {divisor(r, p.shape) for r in _FIT_REDUCTIONS}
        for formula, k in itertools.product(dict.fromkeys((conv.formula, "exact")), POWERS):
            d = float(np.sum(p.rows(formula, False)[0]) * temp**k / value)
            if math.isfinite(d) and d > 0 and all(abs(d - s) > 1e-6 * s for s in standard):
                # the round candidates first (a run computed in float32 fits D to ~1e-7): every run decides
                for c in dict.fromkeys((float(round(d)) or d, float(f"{d:.6g}"), d)):
                    out.append(Fitted(formula, f"fixed:{c:.17g}", k))
    reductions = _FIT_REDUCTIONS if value.ndim == 0 else ("per-token",)
    sums = np.array([np.sum(p.rows(jsd_name(b), False)[0]) for b in _BETA_GRID])
    for r, k in itertools.product(reductions, POWERS):
        target = float(np.sum(value)) * divisor(r, p.shape) / temp**k

        def gap(b: float, target: float = target) -> float:
            return float(np.sum(p.rows(jsd_name(b), False)[0])) - target

        for beta in _roots(gap, sums - target):
            out += [Fitted(jsd_name(round(beta, 2), 2), r, k), Fitted(jsd_name(beta), r, k)]
    return out


def _roots(f: Callable[[float], float], on_grid: F64) -> list[float]:
    """The roots of ``f`` on (0, 1) between sign changes of its values on ``_BETA_GRID``."""
    from scipy.optimize import brentq

    out = []
    for i in np.flatnonzero(np.sign(on_grid[:-1]) * np.sign(on_grid[1:]) <= 0):
        a, b = float(_BETA_GRID[i]), float(_BETA_GRID[i + 1])
        out.append(a if on_grid[i] == 0 else float(brentq(f, a, b, xtol=1e-14)))
    return out
