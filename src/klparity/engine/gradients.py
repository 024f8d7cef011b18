"""Gradient parity: d(KL loss)/d(logits) of each framework API against float64 references.

References, NumPy float64 only:

* the exact gradient of KL(p || q), p = softmax(t/T), q = softmax(s/T), per row:
  d/ds_k = (q_k - p_k) / T and d/dt_k = p_k (log p_k - log q_k - KL) / T (the latter from
  dKL/dp_j = log p_j - log q_j + 1 and dp_j/dt_k = p_j (delta_jk - p_k) / T; the +1 cancels because
  sum_j p_j = 1), times the reduction's scale;
* each API's formula differentiated by hand, following its backward pass op by op (its spec's
  ``grad_model`` in ``klparity.apis``), quirks included: torch's xlogy backward is 0/0 = NaN at a zero target, Keras's
  clip has a 0/1 derivative so classes with q < epsilon get no gradient, and in float16 Keras's
  division gradient ``(-y_true / y_pred) / y_pred`` overflows.

The formula's discrete decisions (which target is exactly 0, which probability the clip cuts,
what overflows) are taken on the values the API received (``GradOutput.seen_*``), where they are
exact; the values it should return are computed from the exact float64 probabilities. As in the
forward checks, each gradient is judged twice: against the API's formula within the tolerance of
``tolerances.grad_budget``, then the formula against the exact gradient, where every difference must
be one of ``GRAD_DIFFERENCES`` (its size is recorded).

Repro of one cell: ``python -m klparity.engine.gradients --framework ... --api ... --case ...`` (see ``main``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from typing import Final

import numpy as np
from numpy.typing import NDArray

from klparity import apis
from klparity.apis.base import GradModel
from klparity.engine import grid
from klparity.engine.forward import Cell
from klparity.engine.judge import check_warnings, compare, failure_report, located
from klparity.frameworks import DEVICES, LAYOUTS, REGISTRY, Adapter
from klparity.model import CheckResult, GradOutput
from klparity.numerics.dtypes import DTYPE_NAMES
from klparity.numerics.errormodel import same_sum
from klparity.numerics.exact import case_exact, rounded

F64 = NDArray[np.float64]

#: Gradient cells of the quick tier use these dtypes; the full tier uses every dtype.
QUICK_GRAD_DTYPES: Final = ("float32", "float64")
#: Documented differences between an API's gradient and the exact gradient (name -> what and why).
GRAD_DIFFERENCES: Final = apis.GRAD_DIFFERENCES


# ------------------------------------------------------------------------------------ driver


def supports_gradients(adapter: Adapter) -> bool:
    """The adapter implements ``run_grad`` (checked without importing its framework)."""
    return type(adapter).run_grad is not Adapter.run_grad


def grad_cells(sel: grid.Selection) -> list[Cell]:
    """Gradient cells of a selection: the forward grid's cells whose spec has a gradient model; in the
    quick tier float32/float64 only and each spec's ``full_tier_only_grad_entries`` left out."""
    dtypes = sel.dtypes if sel.tier == "full" else tuple(d for d in sel.dtypes if d in QUICK_GRAD_DTYPES)
    frameworks = tuple(f for f in sel.frameworks if supports_gradients(REGISTRY[f]))
    sub = dataclasses.replace(sel, dtypes=dtypes, frameworks=frameworks)
    out = []
    for c in grid.cells(sub):
        api_spec = apis.spec(c.api)
        quick_ok = sel.tier == "full" or c.api.entry not in api_spec.full_tier_only_grad_entries
        if api_spec.has_gradients(c.api) and quick_ok:
            out.append(c)
    return out


def grad_repro(cell: Cell, shift: int) -> str:
    """One-line command reproducing a gradient cell outside pytest."""
    return (
        f"python -m klparity.engine.gradients --framework {cell.framework} --api '{cell.api.id}' --case "
        f"{cell.case.id} --dtype {cell.dtype} --device {cell.device} --layout {cell.layout} --seed {shift}"
    )


def _judge_meaning(res: CheckResult, ref: F64, exact: F64, tol: F64, known: list[str],
                   bound: F64 | None) -> None:  # fmt: skip
    with np.errstate(invalid="ignore"):
        gap = np.abs(ref - exact)
    same_nan = np.isnan(ref) == np.isnan(exact)
    close = same_nan & (np.isnan(exact) | (np.isinf(exact) & (ref == exact)) | (gap <= tol))
    if bool(np.all(close)):
        return
    finite = gap[np.isfinite(gap)]
    res.exact_gap = float(np.max(finite)) if finite.size else math.inf
    if not known:
        res.fail(f"the API's gradient formula differs from the exact gradient (gap {res.exact_gap:.3g}) "
                 "with no documented difference to explain it: a model bug or an undocumented quirk")  # fmt: skip
        return
    largest = np.abs(exact[np.isfinite(exact)])
    share = res.exact_gap / float(np.max(largest)) if largest.size and np.max(largest) > 0 else math.inf
    rows = int(np.sum(np.any(~close, axis=-1))) if ref.ndim > 1 else int(not np.all(close))
    res.differences = [f"{name}: {GRAD_DIFFERENCES[name]} (gap here {res.exact_gap:.3g} = {share:.3g} of the "
                       f"largest exact gradient component; {rows} row(s) differ)" for name in known]  # fmt: skip
    if bound is not None:
        slack = same_sum("float64", ref.shape[-1], 1.0)  # the bound and the gap are float64 sums too
        with np.errstate(invalid="ignore"):
            over = same_nan & np.isfinite(exact) & np.isfinite(ref) & (gap > bound + tol + slack * (bound + gap))
        if over.any():
            res.fail(f"gap to the exact gradient {float(np.max(gap[over])):.3g} exceeds the derived "
                     f"clipping bound {float(np.max(bound[over])):.3g}")  # fmt: skip


def run_grad_cell(adapter: Adapter, cell: Cell, shift: int = 0,
                  call: Callable[..., dict[str, GradOutput]] | None = None) -> list[CheckResult]:  # fmt: skip
    """Run one gradient cell: per reduction, judge d/d student and d/d teacher (two results each).

    ``call`` replaces ``adapter.run_grad`` (for tests).
    """
    case, dtype, api = cell.case, cell.dtype, cell.api
    t_r, s_r = rounded(case, shift, dtype)
    ex = case_exact(case, shift, dtype)
    compute = adapter.compute_dtype(api, dtype)
    outputs = (call or adapter.call_grad)(api, t_r, s_r, case.temperature, cell.device, cell.layout)
    first = outputs[api.reductions[0]]
    api_spec = apis.spec(api)
    model: GradModel = api_spec.grad_model(api, ex, first, dtype, compute, cell.framework)
    results = []
    known = model.differences(first)  # the same inputs reach every reduction
    patterns: dict[float, tuple[F64, F64]] = {}
    for red in api.reductions:
        out = outputs[red]
        scale = api_spec.grad_scale(red, case.shape)
        if scale not in patterns:
            patterns[scale] = model.pattern(out, scale)
        pat_s, pat_t = patterns[scale]
        for wrt, obs, value, pat, exact, tol, bound in (
            ("student", out.student, model.student, pat_s, model.exact_student, model.budget.student(scale),
             model.gap_bound),
            ("teacher", out.teacher, model.teacher, pat_t, model.exact_teacher, model.budget.teacher(scale), None),
        ):  # fmt: skip
            res = CheckResult(cell.framework, f"d/d{wrt} {api.id}", red, dtype, cell.device, cell.layout,
                              case.id, case.seed(shift), reason=model.budget.reason)  # fmt: skip
            with np.errstate(invalid="ignore", over="ignore"):
                ref = np.where(np.isfinite(pat), scale * value, pat)
            # the formula on the seen values is finite where the exact inputs hold a NaN (Keras's clip
            # zeroes a NaN's gradient): there only finiteness is judged, the values mean nothing
            free = np.isfinite(pat) & np.isnan(value)
            if obs is not None and free.any():
                ref = np.where(free & np.isfinite(obs), obs, ref)
            if obs is None:
                res.fail(f"the API returned no gradient w.r.t. the {wrt} logits (gradients stopped)")
            else:
                compare(res, obs, ref, tol)
            if out.dtype != dtype:
                res.fail(f"gradient dtype {out.dtype}, expected {dtype} (the logits' dtype)")
            check_warnings(res, api_spec.warning(red), out.warnings)
            relevant = [k for k in known if api_spec.grad_difference_applies(api, k, wrt)]
            _judge_meaning(res, ref, scale * exact, tol, relevant, None if bound is None else scale * bound)
            results.append(res)
    return results


def grad_failure_message(cell: Cell, shift: int, results: list[CheckResult]) -> str:
    """A standalone message for a failed gradient cell: what, where, how far off, why, a repro."""
    return failure_report(f"gradients of {located(cell, shift)}", results, grad_repro(cell, shift),
                          counted="checks failed", label=lambda r: f"{r.api.split(' ')[0]} reduction={r.reduction}")


# ------------------------------------------------------------------------------------- repro


def main(argv: Sequence[str] | None = None) -> int:
    """Run one gradient cell and print its verdict; exit status 1 if any check failed, 2 on bad input."""
    ap = argparse.ArgumentParser(prog="python -m klparity.engine.gradients", description=main.__doc__)
    ap.add_argument("--framework", required=True, choices=sorted(REGISTRY))
    ap.add_argument(
        "--api", required=True, help="API id as printed in a failure message or the report"
    )
    ap.add_argument("--case", required=True)
    ap.add_argument("--dtype", required=True, choices=DTYPE_NAMES)
    ap.add_argument("--device", default="cpu", choices=DEVICES)
    ap.add_argument("--layout", default="contiguous", choices=LAYOUTS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    adapter = REGISTRY[args.framework]
    try:
        if not adapter.available():
            raise ValueError(adapter.missing_reason())
        cell = grid.cell_by_ids(args.framework, args.api, args.case, args.dtype, args.device, args.layout)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    reason = grid.skip_reason(cell, args.seed)
    if reason:
        print(f"skipped: {reason}")
        return 0
    results = run_grad_cell(adapter, cell, args.seed)
    for r in results:
        print(f"{r.api} reduction={r.reduction}: {'ok' if r.ok else 'FAIL'}, max abs {r.max_abs:.3g}, "
              f"err/tol {r.tightness:.3g}" + "".join(f"\n  difference {d}" for d in r.differences))  # fmt: skip
    if not all(r.ok for r in results):
        print(grad_failure_message(cell, args.seed, results))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
