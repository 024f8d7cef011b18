"""The golden tier's runner: each framework's KL rows and batch reduction against mpmath goldens.

The forward tests judge a framework against the float64 oracle, so a bug shared by the oracle and a
framework (or an oracle change that hides a framework change) could cancel out. Here the reference
is the golden file (``klparity.numerics.goldens``): KL rows computed with mpmath at 60 digits from the exact
dtype values. Tolerances come from the same error model (``tolerances.budget``) built from the
golden inputs. Per API semantics:

* torch (``kl_div`` / ``KLDivLoss``): ``reduction='none'`` summed over the class axis in float64 is
  each row's KL, ``'batchmean'`` is ``kl_sum / input.size(0)``; where a documented quirk turns a row
  into NaN (``0 * -inf``: a class masked on both sides, or any zero target with ``log_target=True``)
  NaN is required, so a fix upstream shows up as a failure that asks to update the documentation.
  The gradient w.r.t. the student logits (autograd through ``log_softmax(s / T)``) is checked
  against the golden gradient elementwise (``tolerances.golden_gradient``).
* Keras: it clips p and q to [1e-7, 1] and does not renormalise, so it computes the exact KL only
  on rows where no p_j or q_j falls below 1e-7 (and, computing in float16, where no p_j / q_j
  overflows). Those rows are compared with the golden; the others with the clipped formula
  (``keras_formula.keras_kl_divergence``) on the golden inputs, whose gap to the golden must stay within
  ``keras_formula.keras_clip_gap_bound``. ``sum_over_batch_size`` is the mean of the expected rows.
* optax: ``kl_divergence`` gives NaN on a class masked on both sides (``0 * inf``),
  ``kl_divergence_with_log_targets`` on any zero target (``exp(-inf) * -inf``); other rows must
  match the golden. ``sum(rel_entr(p, q))`` works on probabilities without clipping: a row where
  some q_j underflows to 0 in the dtype while p_j > 0 is +inf there, and is compared only for it.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from klparity import apis
from klparity.engine.judge import failure_report
from klparity.engine.judge import judge as judge_outputs
from klparity.frameworks import REGISTRY, Adapter
from klparity.model import Api, CheckResult, Exact, Expectation, GoldenExpected, GoldenGradient, Output
from klparity.numerics import goldens
from klparity.numerics.exact import exact_of, overflow_reason

F64 = NDArray[np.float64]

#: Suffix of the API id in reports, so golden checks form their own rows of the verdict matrix.
TAG = goldens.TAG


class GoldenCell(NamedTuple):
    """One pytest item: a framework on one device against one golden case."""

    framework: str
    device: str
    golden: str
    dtype: str
    directory: Path


def in_quick_tier(case_id: str) -> bool:
    """Every special family, and a fixed half (by crc32 of the id) of the plain Gaussian goldens:
    the quick tier keeps each family and dtype while halving JIT frameworks' per-shape compilation."""
    if not case_id.startswith(("gauss", "peaked")):
        return True
    return zlib.crc32(case_id.encode("utf-8")) % 2 == 0


@functools.lru_cache(maxsize=2)
def load(directory: Path) -> dict[str, goldens.Golden]:
    """The golden cases under ``directory``, by id (read once per process)."""
    return {g.id: g for g in goldens.load(directory)}


def expected(g: goldens.Golden, api: Api, fw: str, compute: str, ex: Exact | None = None) -> GoldenExpected:
    """What ``api`` must return per row and in total for golden ``g`` (its record's ``golden_expected``;
    raises for a record without one); ``ex``: ``exact_of`` the golden's inputs, when the caller has it."""
    ex = ex if ex is not None else exact_of(g.teacher, g.student, g.temperature)
    return apis.spec(api).golden_expected(g, ex, api, fw, compute)


def judge(adapter: Adapter, api: Api, g: goldens.Golden, device: str, ex: Exact | None = None) -> list[CheckResult]:
    """Run ``api`` on the golden's exact inputs and judge every reduction against the golden with the one
    judge (``ex``: ``exact_of`` those inputs, shared by the framework's APIs). The golden is the exact
    value, so the formula-versus-exact half of the judgement has nothing to explain; warnings are the
    forward tier's to judge."""
    compute = adapter.compute_dtype(api, g.dtype)
    exp = expected(g, api, adapter.name, compute, ex)
    plan = apis.spec(api).golden_reductions(api, g.shape)
    teacher, student = g.typed()
    outputs = adapter.call(dataclasses.replace(api, reductions=tuple(plan)), teacher, student,
                          g.temperature, device, "contiguous")  # fmt: skip
    expectations: dict[str, Expectation] = {}
    seen: dict[str, Output] = {}
    for red, (to_rows, divisor) in plan.items():
        value = np.asarray(outputs[red].value, np.float64)
        if to_rows is not None:
            with np.errstate(invalid="ignore", over="ignore"):
                obs = np.asarray(to_rows(value), np.float64)
            expectations[red] = Expectation(exp.rows, exp.tol_rows, exp.rows, None, compute, None,
                                            inf_allowed=exp.either_inf)  # fmt: skip
        else:
            obs, total = value, np.asarray(exp.total / divisor)
            expectations[red] = Expectation(total, exp.tol_total / divisor, total, None, compute, None)
        seen[red] = Output(obs, outputs[red].dtype)

    def result(red: str) -> CheckResult:
        res = CheckResult(adapter.name, api.id + TAG, red, g.dtype, device, "contiguous", g.id, 0)
        res.differences = list(exp.notes)
        for problem in exp.problems:
            res.fail(problem)
        return res

    return judge_outputs(expectations, seen, [], result, g.shape, meaning=False)


def judge_gradient(gg: GoldenGradient, g: goldens.Golden) -> CheckResult:
    """A record's gradient on a golden against the golden's (mpmath) gradient, with the one judge."""
    res = CheckResult(gg.framework, gg.api, gg.label, g.dtype, "cpu", "contiguous", g.id, 0)
    exp = Expectation(g.grad, gg.tolerance, g.grad, None, gg.expected_dtype, None)
    seen = {gg.label: Output(gg.observed, gg.dtype)}
    return judge_outputs({gg.label: exp}, seen, [], lambda _: res, g.shape, meaning=False)[0]


def run(cell: GoldenCell) -> list[CheckResult] | str:
    """Every API of the framework with goldens on the golden case (and each record's gradient check,
    once per framework on the CPU); a string: why the cell is skipped."""
    adapter = REGISTRY[cell.framework]
    if cell.device not in adapter.devices():
        return f"no {cell.device} device visible to {cell.framework}"
    g = load(cell.directory)[cell.golden]
    reason = overflow_reason(g.teacher, g.student, g.temperature, g.dtype)
    if reason:
        return reason
    results: list[CheckResult] = []
    ex = exact_of(g.teacher, g.student, g.temperature)
    specs = []
    for api in (a for a in apis.entries(adapter.name, g.dtype) if apis.spec(a).has_goldens() and not a.missing()):
        results += judge(adapter, api, g, cell.device, ex)
        if apis.spec(api) not in specs:
            specs.append(apis.spec(api))
    if cell.device == "cpu":
        results += [judge_gradient(gg, g) for gg in (s.golden_gradient(g, ex) for s in specs) if gg is not None]
    return results


def message(cell: GoldenCell, results: list[CheckResult]) -> str:
    """A failure message that stands alone, with its repro."""
    g = load(cell.directory)[cell.golden]
    what = f"{cell.framework} on golden {g.id} (T={g.temperature:g}, shape {g.shape}, {cell.device})"
    repro = f"pytest --pyargs klparity.suite.test_goldens -k '{cell.framework}-{cell.device}-{g.id}'"
    return failure_report(what, results, repro, counted="checks failed against the mpmath reference",
                          label=lambda r: f"{r.api} reduction={r.reduction}", notes=True, reason=False)
