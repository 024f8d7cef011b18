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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from klparity.apis import spec
from klparity.apis.base import overflow_masks
from klparity.engine.judge import compare, judge
from klparity.engine.judge import failure_message as judge_failure_message
from klparity.frameworks import REGISTRY, Adapter
from klparity.model import Api, CheckResult, Output
from klparity.numerics.cases import Case
from klparity.numerics.dtypes import dtype_info
from klparity.numerics.errormodel import table_row
from klparity.numerics.exact import case_exact, rounded

F64 = NDArray[np.float64]


# ---------------------------------------------------------------------------------- comparison


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
    outputs = (call or adapter.call)(cell.api, t_r, s_r, case.temperature, cell.device, cell.layout)
    known = api_spec.known_differences(cell.api, ex, compute)
    expected, api_overflowed = api_spec.adjust(expected)
    seed = case.seed(shift)

    def result(red: str) -> CheckResult:
        return CheckResult(cell.framework, cell.api.id, red, dtype, cell.device, cell.layout, case.id, seed,
                           reason=bud.reason)  # fmt: skip

    results = judge(expected, outputs, known, result, case.shape, overflowed=api_overflowed)
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




def failure_message(cell: Cell, shift: int, results: list[CheckResult]) -> str:
    """The suite's failure message for a forward cell, with its ``klparity run-cell`` repro."""
    return judge_failure_message(cell, shift, results, repro(cell, shift))
