"""One parity check: run a framework API on a case and judge it against the oracle.

A *cell* is (framework, API, case, dtype, device, layout). Running it calls the API once per
reduction and yields one ``CheckResult`` per reduction, each judged twice:

1. **semantics**: the framework against its API's documented formula evaluated exactly in float64
   (its spec's ``expectations``) on the values it saw, within the
   derived tolerance; NaN and inf patterns, result shape and result dtype must match exactly;
2. **meaning**: that formula against the exact KL divergence, reduced the same way. Where they
   differ, the difference must be one of the documented ones in ``DIFFERENCES`` (its size is
   recorded); where the spec derives a bound on the gap (a clipping gap), it must stay within it.

What an API computes, how it reduces and how it differs from the exact KL is its spec's
(``klparity.apis``); this module knows no framework or API by name.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, Protocol, TypeVar, cast

import numpy as np
from numpy.typing import NDArray

from klparity import oracle
from klparity.apis import DIFFERENCES, RESULT_OVERFLOW, spec
from klparity.apis.base import Expectation, overflow_masks
from klparity.cases import Case
from klparity.dtypes import dtype_info, round_to, widen
from klparity.frameworks import REGISTRY, Adapter, Api, Output
from klparity.tolerances import table_row

F64 = NDArray[np.float64]

@dataclass
class CheckResult:
    """The verdict on one reduction of one cell, JSON-serialisable via ``to_dict``."""

    framework: str
    api: str
    reduction: str
    dtype: str
    device: str
    layout: str
    case: str
    seed: int
    ok: bool = True
    max_abs: float = 0.0
    max_rel: float = 0.0
    tightness: float = 0.0  #: max over entries of |error| / tolerance
    tolerance: float = 0.0  #: largest tolerance over entries
    exact_gap: float = 0.0  #: |API formula - exact KL|, max over entries (a documented difference)
    problems: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    reason: str = ""

    def fail(self, message: str) -> None:
        """Record a problem; the check fails."""
        self.ok = False
        self.problems.append(message)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with JSON-safe floats (inf/nan as strings)."""
        d: dict[str, Any] = {}
        for f in fields(self):  # shallow: asdict's deep copies cost more than the check itself
            v = getattr(self, f.name)
            if isinstance(v, list):
                v = list(v)
            elif isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            d[f.name] = v
        return d


@dataclass(frozen=True)
class Exact:
    """Float64 quantities derived from the rounded logits of one case."""

    teacher: F64
    student: F64
    temperature: float
    zt: F64
    zs: F64
    lp: F64
    lq: F64
    p: F64
    q: F64
    rows: F64  #: exact per-row KL

    @classmethod
    def of(cls, teacher: F64, student: F64, temperature: float, oracle_name: str = "numpy") -> Exact:
        """Everything derived from the rounded logits; ``oracle_name`` picks the exact rows (``ORACLES``)."""
        if oracle_name not in ORACLES:
            raise ValueError(f"unknown oracle {oracle_name!r}; expected one of {', '.join(ORACLES)}")
        with np.errstate(invalid="ignore"):
            zt, zs = teacher / temperature, student / temperature
        lp, lq = oracle.log_softmax(teacher, temperature), oracle.log_softmax(student, temperature)
        return cls(
            teacher, student, temperature, zt, zs, lp, lq, np.exp(lp), np.exp(lq),
            oracle.kl_from_logits(teacher, student, temperature) if oracle_name == "numpy"
            else scipy_rows(teacher, student, temperature),
        )  # fmt: skip


_V = TypeVar("_V")


class _Kept:
    """Least-recently-used store of read-only arrays, bounded by their bytes.

    Every API of a framework, the skip check and the gradient cells judge the same case in the same
    dtype: the rounded logits and their exact quantities are made once per process, not once per
    cell. Values are read-only, so no caller can change what the next one reads.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._items: OrderedDict[tuple[object, ...], tuple[Any, int]] = OrderedDict()

    def get(self, key: tuple[object, ...], make: Callable[[], tuple[_V, list[NDArray[Any]]]]) -> _V:
        """The value kept under ``key``, else ``make()``'s value (its arrays made read-only), kept if it fits."""
        if key in self._items:
            self._items.move_to_end(key)
            value: _V = self._items[key][0]
            return value
        value, arrays = make()
        size = 64  # the entry itself, so that entries without arrays are bounded too
        for a in arrays:
            a.flags.writeable = False
            size += a.nbytes
        if size <= self.limit:
            self._items[key] = (value, size)
            self.used += size
            while self.used > self.limit:
                _, (_, freed) = self._items.popitem(last=False)
                self.used -= freed
        return value


#: the quick tier's cases in one dtype take ~26 MiB of exact quantities; the full tier's do not fit
_KEPT = _Kept(64 << 20)


def rounded(case: Case, shift: int, dtype: str) -> tuple[NDArray[np.generic], NDArray[np.generic]]:
    """The case's (teacher, student) logits rounded to ``dtype``: what a framework receives (read-only)."""

    def make() -> tuple[tuple[NDArray[np.generic], NDArray[np.generic]], list[NDArray[Any]]]:
        t64, s64 = case.logits(shift)
        t_r, s_r = round_to(t64, dtype), round_to(s64, dtype)
        return (t_r, s_r), [t_r, s_r]

    return _KEPT.get(("rounded", case, shift, dtype), make)


def case_overflow(case: Case, shift: int, dtype: str) -> str | None:
    """``overflow_reason`` of the case's logits rounded to ``dtype`` (kept: every API's cell asks)."""

    def make() -> tuple[str | None, list[NDArray[Any]]]:
        t_r, s_r = rounded(case, shift, dtype)
        return overflow_reason(widen(t_r), widen(s_r), case.temperature, dtype), []

    return _KEPT.get(("overflow", case, shift, dtype), make)


def case_exact(case: Case, shift: int, dtype: str, oracle_name: str = "numpy") -> Exact:
    """``Exact.of`` the case's logits rounded to ``dtype`` (read-only arrays)."""

    def make() -> tuple[Exact, list[NDArray[Any]]]:
        t_r, s_r = rounded(case, shift, dtype)
        ex = Exact.of(widen(t_r), widen(s_r), case.temperature, oracle_name)
        return ex, [getattr(ex, f.name) for f in fields(ex) if isinstance(getattr(ex, f.name), np.ndarray)]

    return _KEPT.get(("exact", case, shift, dtype, oracle_name), make)


#: Exact per-row KL: ``numpy`` is ``oracle.kl_from_logits`` (log space, phi-form sum); ``scipy`` is
#: the cross-oracle ``scipy_rows`` (``--klparity-oracle``), an independent second implementation.
ORACLES: Final = ("numpy", "scipy")


def scipy_rows(teacher: F64, student: F64, temperature: float) -> F64:
    """Per-row ``sum(scipy.special.rel_entr(p, q), axis=-1)``, p and q the float64 softmax of the logits.

    In probability space: a class whose float64 probability underflows to 0 while its log-probability
    is finite is lost (and gives +inf against a teacher with mass there), unlike ``kl_from_logits``.
    """
    import scipy.special  # lazily: SciPy belongs to the test extra, not to the package's dependencies

    p, q = oracle.softmax(teacher, temperature), oracle.softmax(student, temperature)
    return np.asarray(np.sum(scipy.special.rel_entr(p, q), axis=-1), dtype=np.float64)


def overflow_reason(teacher: F64, student: F64, temperature: float, dtype: str) -> str | None:
    """Why a case is meaningless in ``dtype`` (logits / T or their spread overflow), else None."""
    with np.errstate(invalid="ignore", over="ignore"):
        both = np.concatenate([teacher.ravel(), student.ravel()]) / temperature
    finite = both[np.isfinite(both)]
    biggest = float(np.max(np.abs(finite))) if finite.size else 0.0
    if 2.0 * biggest >= dtype_info(dtype).max:
        return f"|logits / T| up to {biggest:.3g} overflows {dtype} (max {dtype_info(dtype).max:.3g})"
    return None


# ---------------------------------------------------------------------------------- comparison


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


# ------------------------------------------------------------------------------------ driver


@dataclass(frozen=True)
class Cell:
    """A (framework, API, case, dtype, device, layout) combination: one pytest item."""

    framework: str
    api: Api
    case: Case
    dtype: str
    device: str
    layout: str

    @property
    def id(self) -> str:
        return f"{self.api.id}-{self.dtype}-{self.device}-{self.layout}-{self.case.id}"


def repro(cell: Cell, shift: int) -> str:
    """One-line command reproducing a cell outside pytest."""
    return (
        f"klparity run-cell --framework {cell.framework} --api '{cell.api.id}' --case "
        f"{cell.case.id} --dtype {cell.dtype} --device {cell.device} --layout {cell.layout} "
        f"--seed {shift}"
    )


def run_cell(adapter: Adapter, cell: Cell, shift: int = 0,
             call: Callable[..., dict[str, Output]] | None = None, *,
             oracle_name: str = "numpy") -> list[CheckResult]:  # fmt: skip
    """Run one cell and judge every reduction. ``call`` replaces ``adapter.run`` (for tests);
    ``oracle_name`` picks the exact per-row KL (``ORACLES``, ``--klparity-oracle``)."""
    case, dtype = cell.case, cell.dtype
    t_r, s_r = rounded(case, shift, dtype)
    ex = case_exact(case, shift, dtype, oracle_name)
    compute = adapter.compute_dtype(cell.api, dtype)
    api_spec = spec(cell.api)
    expected, bud = api_spec.expectations(cell.api, ex, dtype, compute, cell.framework)
    outputs = (call or adapter.run)(cell.api, t_r, s_r, case.temperature, cell.device, cell.layout)
    known = api_spec.known_differences(cell.api, ex, compute)
    expected, api_overflowed = api_spec.adjust(expected)
    expected, overflowed = within_result_range(expected)
    if overflowed or api_overflowed:
        known.append(RESULT_OVERFLOW)
    expected = accept_inf_where_allowed(expected, outputs)
    results = []
    for red, exp in expected.items():
        res = CheckResult(cell.framework, cell.api.id, red, dtype, cell.device, cell.layout,
                          case.id, case.seed(shift), reason=bud.reason)  # fmt: skip
        out = outputs[red]
        compare(res, out.value, exp.value, exp.tolerance)
        if not res.ok:
            res.problems[-1] += _alternatives(out.value, exp, case.shape)
        if out.dtype != exp.dtype:
            res.fail(f"result dtype {out.dtype}, expected {exp.dtype}"
                     + (" (computed through a lower precision?)" if exp.dtype == "float64" else ""))  # fmt: skip
        warned = any(exp.must_warn in w for w in out.warnings) if exp.must_warn else False
        if exp.must_warn and not warned:
            res.fail(f"expected the API's warning containing {exp.must_warn!r}; none was raised "
                     "(has the reduction changed meaning?)")  # fmt: skip
        if not exp.must_warn and out.warnings:
            res.fail(f"unexpected warning: {out.warnings[0]}")
        _judge_meaning(res, exp, known)
        results.append(res)
    results += _reduction_consistency(cell, case.seed(shift), outputs, compute)
    return results


def _reduction_consistency(cell: Cell, seed: int, outputs: dict[str, Output], compute: str) -> list[CheckResult]:
    """Each reduction against the framework's *own* unreduced output, summed exactly in float64.

    This isolates the reduction kernel from the elementwise error: with t the 'none' output (the
    very values the reduction sums), a sum over n terms accumulated in u_acc is off by at most
    log2(n) u_acc sum|t| for a pairwise sum (the adapter's ``reduction_roundings``: more for a kernel
    that adds in lanes or one term at a time), the result is rounded once to the compute dtype and divided once:
    2 u_c |value| (one subnormal spacing where the result is that small). So an accumulator in a
    lower precision, or a wrong divisor, shows even where the end-to-end tolerance is dominated by
    half-precision elementwise rounding.
    """
    api_spec = spec(cell.api)
    if not api_spec.reduces_own_output() or "none" not in outputs:
        return []
    pointwise = np.asarray(outputs["none"].value, np.float64)
    if not np.all(np.isfinite(pointwise)) or pointwise.ndim == 0:
        return []  # special values are judged by the main checks; a scalar has nothing to reduce
    u_c = dtype_info(compute).unit_roundoff
    u64 = dtype_info("float64").unit_roundoff
    u_acc = dtype_info(table_row(cell.framework, cell.dtype).accumulate).unit_roundoff
    if compute not in ("float16", "bfloat16"):
        u_acc = max(u_acc, u_c)
    abs_sum = float(np.sum(np.abs(pointwise)))
    n = max(pointwise.size, 2)
    out = []
    for red, got in outputs.items():
        if red == "none":
            continue
        r = api_spec.resolve(red)
        expected = api_spec.reduce(pointwise, r)
        divisor = api_spec.divisor(r, pointwise.shape)
        # + one subnormal spacing: the result's rounding and division, where it is subnormal
        # (u_acc + u_64: our own float64 pairwise sum of the same terms)
        roundings = REGISTRY[cell.framework].reduction_roundings(r, n)  # log2 n for a pairwise sum
        tol = ((roundings * (u_acc + u64) + u_c) * abs_sum / divisor + 2 * u_c * abs(float(expected))
               + dtype_info(compute).smallest_subnormal)  # fmt: skip
        if api_spec.sum_rounded_first(r):
            total = float(np.sum(pointwise))
            surely, maybe = overflow_masks(np.asarray(total), tol * divisor, compute)
            if bool(surely) or (bool(maybe) and np.isinf(got.value).all()):
                expected = np.asarray(math.copysign(math.inf, total))
        res = CheckResult(cell.framework, cell.api.id, f"{red} vs own none", cell.dtype, cell.device,
                          cell.layout, cell.case.id, seed, reason="reduction of the framework's own "
                          "elementwise output: log2(n) u_acc sum|t| + rounding and division of the result")  # fmt: skip
        compare(res, got.value, expected, tol)
        if not res.ok:
            res.problems[-1] += " (the reduction itself is off: its own elementwise output, summed exactly, disagrees)"
        out.append(res)
    return out


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


def failure_message(cell: _Located, shift: int, results: list[CheckResult], repro_line: str | None = None) -> str:
    """A message that stands alone: what, where, how far off, the tolerance's reason, a repro
    (``repro_line``, by default the ``klparity run-cell`` command of a forward cell)."""
    bad = [r for r in results if not r.ok]
    lines = [f"{cell.api.id} on {cell.case.id} (seed {cell.case.seed(shift)}), {cell.dtype}, "
             f"{cell.device}, {cell.layout}: {len(bad)} of {len(results)} reductions failed"]  # fmt: skip
    for r in bad:
        lines.append(f"  reduction={r.reduction}: max abs {r.max_abs:.3g}, max rel {r.max_rel:.3g}, "
                     f"tolerance {r.tolerance:.3g}")  # fmt: skip
        lines += [f"    - {p}" for p in r.problems]
    lines.append(f"  tolerance: {bad[0].reason if bad else ''}")
    lines.append(f"  repro: {repro_line if repro_line is not None else repro(cast(Cell, cell), shift)}")
    return "\n".join(lines)
