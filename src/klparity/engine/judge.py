"""The one judge: a framework's outputs against the expectations of its API's record.

``judge`` takes what a reduction must return (``Expectation``: value, tolerance, exact KL, gap bound,
dtype, warning) and what the framework returned (``Output``), and yields one ``CheckResult`` per
reduction, each judged twice: against the API's formula on the values it saw (NaN/inf patterns,
shape and dtype exactly, values within the derived tolerance), and that formula against the exact KL
(a difference must be a documented one, within its derived bound). The forward, gradient, golden and
scale runners all judge through ``compare`` / ``judge``; this module knows no framework or API.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from klparity.apis import DIFFERENCES, RESULT_OVERFLOW
from klparity.apis.base import overflow_masks
from klparity.model import Api, CheckResult, Expectation, Output

F64 = NDArray[np.float64]


def _index(mask: NDArray[np.bool_]) -> str:
    idx = np.argwhere(mask)
    return str(tuple(int(i) for i in idx[0])) if idx.size else "()"


def compare(res: CheckResult, obs: F64, ref: F64, tol: F64 | float) -> None:
    """Judge ``obs`` against ``ref`` entrywise: NaN/inf patterns exactly, finite values within ``tol``."""
    obs, ref = np.asarray(obs, np.float64), np.asarray(ref, np.float64)
    tol_a = np.broadcast_to(np.asarray(tol, np.float64), ref.shape)
    if obs.shape != ref.shape:
        res.fail(f"result shape {obs.shape}, expected {ref.shape}")
        return
    if np.isfinite(obs).all() and np.isfinite(ref).all():  # the common case: no NaN/inf pattern to match
        _compare_finite(res, obs, ref, tol_a, None)
        return
    nan_o, nan_r = np.isnan(obs), np.isnan(ref)
    if (nan_o & ~nan_r).any():
        i = nan_o & ~nan_r
        res.fail(f"NaN where the reference is finite at {int(i.sum())} of {i.size} entries, first "
                 f"at {_index(i)} (reference {ref[tuple(np.argwhere(i)[0])]:.17g})")  # fmt: skip
    if (nan_r & ~nan_o).any():
        i = nan_r & ~nan_o
        res.fail(f"value where the reference is NaN at {int(i.sum())} of {i.size} entries, first "
                 f"at {_index(i)} (got {obs[tuple(np.argwhere(i)[0])]:.17g}): NaN must propagate")  # fmt: skip
    inf_r = np.isinf(ref)
    if (inf_r & (obs != ref)).any():
        i = inf_r & (obs != ref)
        res.fail(f"reference is {ref[tuple(np.argwhere(i)[0])]} at {_index(i)}, got "
                 f"{obs[tuple(np.argwhere(i)[0])]:.17g}")  # fmt: skip
    fin = np.isfinite(ref) & ~nan_o
    if fin.any():
        _compare_finite(res, obs, ref, tol_a, fin)


def _compare_finite(res: CheckResult, obs: F64, ref: F64, tol_a: F64, fin: NDArray[np.bool_] | None) -> None:
    """The value part of ``compare``, on the entries ``fin`` where the reference is finite (None: all)."""
    if fin is None:  # views, no copies: the common case, and the arrays can be large (gradients)
        o, r, t = obs.reshape(-1), ref.reshape(-1), np.broadcast_to(tol_a, ref.shape).reshape(-1)
    else:
        o, r, t = obs[fin], ref[fin], tol_a[fin]
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        err = np.abs(o - r)
        absr = np.abs(r)
        # relative error is undefined where the reference is exactly 0; a zero tolerance allows no error
        rel = np.divide(err, absr, out=np.zeros_like(err), where=absr != 0)
        ratio = np.divide(err, t, out=np.where(err == 0, 0.0, np.inf), where=t > 0)
    k = int(np.argmax(ratio))
    res.max_abs = max(res.max_abs, float(np.max(err)))
    res.max_rel = max(res.max_rel, float(np.max(rel)))
    res.tightness = max(res.tightness, float(ratio[k]))
    res.tolerance = max(res.tolerance, float(np.max(t)))
    if ratio[k] > 1.0:
        n_bad = int(np.count_nonzero(ratio > 1.0))
        if not ref.ndim:
            where: tuple[int, ...] = ()
        elif fin is None:
            where = tuple(int(v) for v in np.unravel_index(k, ref.shape))
        else:
            where = tuple(int(v) for v in np.argwhere(fin)[k])
        res.fail(f"error {float(err[k]):.3g} exceeds tolerance {float(t[k]):.3g} "
                 f"({float(ratio[k]):.3g}x) at {where}: got {float(o[k]):.17g}, "
                 f"reference {float(r[k]):.17g}, {n_bad} of {ratio.size} entries off")  # fmt: skip


def _judge_meaning(res: CheckResult, exp: Expectation, known: list[str]) -> None:
    value, exact = np.asarray(exp.value), np.asarray(exp.exact)
    with np.errstate(invalid="ignore"):
        gap = np.abs(value - exact)
    same_nan = np.isnan(value) == np.isnan(exact)
    both_inf_equal = np.isinf(exact) & (value == exact)
    tol = np.broadcast_to(np.asarray(exp.tolerance, np.float64), exact.shape)
    close = same_nan & (np.isnan(exact) | both_inf_equal | (gap <= tol))
    if bool(np.all(close)):
        return
    differing = gap[~close]
    finite_gap = differing[np.isfinite(differing)]
    res.exact_gap = float(np.max(finite_gap)) if finite_gap.size else math.inf
    if not known:
        res.fail(f"the API formula differs from the exact KL (gap {res.exact_gap:.3g}) with no "
                 "documented difference to explain it: an oracle bug or an undocumented quirk")  # fmt: skip
        return
    res.differences = [f"{name}: {DIFFERENCES[name]} (gap here {res.exact_gap:.3g})" for name in known]
    if exp.gap_bound is not None:
        bound = np.broadcast_to(np.asarray(exp.gap_bound, np.float64), exact.shape)
        with np.errstate(invalid="ignore"):
            over = same_nan & np.isfinite(exact) & (gap > bound + tol)
        if over.any():
            res.fail(f"gap to the exact KL {float(np.max(gap[over])):.3g} exceeds the derived "
                     f"clipping bound {float(np.max(bound[over])):.3g}")  # fmt: skip


def _alternatives(obs: F64, exp: Expectation, shape: tuple[int, ...]) -> str:
    """On a scalar mismatch, name the divisor that would explain the observed value."""
    if np.ndim(obs) or not np.isfinite(obs) or np.ndim(exp.value) or not exp.value:
        return ""
    ratio = float(obs / exp.value)
    names = {
        "B (rows of axis 0)": shape[0], "B*S (all rows)": math.prod(shape[:-1]) or 1,
        "C (classes)": shape[-1], "numel": math.prod(shape),
    }  # fmt: skip
    for name, n in names.items():
        for factor, word in ((n, "multiplied"), (1.0 / n, "divided")):
            if n > 1 and abs(ratio / factor - 1.0) < 1e-2:
                return f"; the observed value is the expected one {word} by {name} = {n}"
    return f"; observed / expected = {ratio:.6g}"


def accept_inf_where_allowed(
    expected: dict[str, Expectation], outputs: dict[str, Output]
) -> dict[str, Expectation]:
    """Where +inf (or NaN) is allowed within rounding error and the API returned it, expect it."""
    out = {}
    for red, exp in expected.items():
        if red in outputs:
            obs = np.asarray(outputs[red].value)
            value = np.asarray(exp.value)
            if exp.inf_allowed is not None:
                value = np.where(exp.inf_allowed & (obs == np.inf), np.inf, value)
            if exp.nan_allowed is not None:
                value = np.where(exp.nan_allowed & np.isnan(obs), np.nan, value)
            exp = replace(exp, value=value)
        out[red] = exp
    return out


def within_result_range(expected: dict[str, Expectation]) -> tuple[dict[str, Expectation], bool]:
    """Values beyond the result dtype's largest finite number round to inf; near it, either is right.

    Returns the adjusted expectations and whether any value reached that range.
    """
    out, hit = {}, False
    for red, exp in expected.items():
        value = np.asarray(exp.value, np.float64)
        surely, maybe = overflow_masks(value, exp.tolerance, exp.dtype)
        if surely.any() or maybe.any():
            hit = True
            allowed = maybe if exp.inf_allowed is None else (exp.inf_allowed | maybe)
            with np.errstate(invalid="ignore"):
                value = np.where(surely, np.copysign(np.inf, value), value)
            exp = replace(exp, value=value, inf_allowed=allowed)
        out[red] = exp
    return out, hit


class _CaseLike(Protocol):
    @property
    def id(self) -> str: ...
    def seed(self, shift: int) -> int: ...


class _Located(Protocol):
    """What a failure message names: a cell of any tier (forward, scale)."""

    @property
    def api(self) -> Api: ...
    @property
    def case(self) -> _CaseLike: ...
    @property
    def dtype(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def layout(self) -> str: ...


def located(cell: _Located, shift: int) -> str:
    """Where a cell is: API, case (with its seed), dtype, device and layout."""
    return f"{cell.api.id} on {cell.case.id} (seed {cell.case.seed(shift)}), {cell.dtype}, {cell.device}, {cell.layout}"


def failure_report(what: str, results: list[CheckResult], repro_line: str, *, counted: str = "reductions failed",
                   label: Callable[[CheckResult], str] = lambda r: f"reduction={r.reduction}",
                   notes: bool = False, reason: bool = True) -> str:  # fmt: skip
    """A message that stands alone, for any tier: how many of ``what``'s checks failed (``counted`` names
    them), each failed check (``label``) with how far off and its problems (and its documented differences
    where ``notes``), the tolerance's reason (where ``reason``), and ``repro_line``."""
    bad = [r for r in results if not r.ok]
    lines = [f"{what}: {len(bad)} of {len(results)} {counted}"]
    for r in bad:
        lines.append(f"  {label(r)}: max abs {r.max_abs:.3g}, max rel {r.max_rel:.3g}, tolerance {r.tolerance:.3g}")
        lines += [f"    - {p}" for p in r.problems]
        if notes:
            lines += [f"    note: {d}" for d in r.differences]
    if reason:
        lines.append(f"  tolerance: {bad[0].reason if bad else ''}")
    lines.append(f"  repro: {repro_line}")
    return "\n".join(lines)


def failure_message(cell: _Located, shift: int, results: list[CheckResult], repro_line: str) -> str:
    """The failure message of a cell judged per reduction (forward, scale), with ``repro_line``."""
    return failure_report(located(cell, shift), results, repro_line)


def check_warnings(res: CheckResult, must_warn: str | None, warnings: tuple[str, ...]) -> None:
    """The API raised the warning its record says it must (``must_warn``), and no other."""
    if must_warn and not any(must_warn in w for w in warnings):
        res.fail(f"expected the API's warning containing {must_warn!r}; none was raised "
                 "(has the reduction changed meaning?)")  # fmt: skip
    if not must_warn and warnings:
        res.fail(f"unexpected warning: {warnings[0]}")


def judge(
    expected: dict[str, Expectation],
    outputs: dict[str, Output],
    known: list[str],
    result: Callable[[str], CheckResult],
    shape: tuple[int, ...],
    *,
    overflowed: bool = False,
    meaning: bool = True,
) -> list[CheckResult]:
    """Judge each output against its expectation: one ``CheckResult`` (made by ``result(label)``) per label.

    ``known``: the documented differences that hold for the case; ``shape``: the logits' shape (to name
    a divisor that explains a wrong scalar); ``overflowed``: the record's own result-range rule applied.
    Values in the result dtype's overflow range, and +inf / NaN allowed within rounding error, are
    resolved first (``within_result_range``, ``accept_inf_where_allowed``). Each result is then judged
    twice: against the expected value (``compare``; dtype, warning) and the formula against the exact
    KL (a difference must be a documented one, within its derived bound); ``meaning=False`` skips the
    latter where the expected value is itself the exact one (goldens), +inf allowances included.
    """
    known = list(known)
    expected, hit = within_result_range(expected)
    if hit or overflowed:
        known.append(RESULT_OVERFLOW)
    expected = accept_inf_where_allowed(expected, outputs)
    results = []
    for label, exp in expected.items():
        res = result(label)
        out = outputs[label]
        compare(res, out.value, exp.value, exp.tolerance)
        if not res.ok:
            res.problems[-1] += _alternatives(out.value, exp, shape)
        if out.dtype != exp.dtype:
            res.fail(f"result dtype {out.dtype}, expected {exp.dtype}"
                     + (" (computed through a lower precision?)" if exp.dtype == "float64" else ""))  # fmt: skip
        check_warnings(res, exp.must_warn, out.warnings)
        if meaning:
            _judge_meaning(res, exp, known)
        results.append(res)
    return results
