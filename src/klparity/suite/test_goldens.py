"""Parity against frozen goldens: each framework's KL rows and batch reduction vs mpmath references.

The forward tests judge a framework against the float64 oracle, so a bug shared by the oracle and a
framework (or an oracle change that hides a framework change) could cancel out. Here the reference
is the golden file (``klparity.goldens``): KL rows computed with mpmath at 60 digits from the exact
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
  (``oracle.keras_kl_divergence``) on the golden inputs, whose gap to the golden must stay within
  ``oracle.keras_clip_gap_bound``. ``sum_over_batch_size`` is the mean of the expected rows.
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
import pytest
from numpy.typing import NDArray

from klparity import apis, goldens
from klparity.apis.base import GoldenExpected
from klparity.checks import CheckResult, Exact, compare, overflow_reason
from klparity.frameworks import REGISTRY, Adapter, Api
from klparity.plugin import _cell_marks, record, selection

F64 = NDArray[np.float64]
pytestmark = pytest.mark.equivalence

#: Suffix of the API id in reports, so golden checks form their own rows of the verdict matrix.
TAG = goldens.TAG


class GoldenCell(NamedTuple):
    """One pytest item: a framework on one device against one golden case."""

    framework: str
    device: str
    golden: str
    dtype: str
    directory: Path


def _in_quick_tier(case_id: str) -> bool:
    """Every special family, and a fixed half (by crc32 of the id) of the plain Gaussian goldens:
    the quick tier keeps each family and dtype while halving JIT frameworks' per-shape compilation."""
    if not case_id.startswith(("gauss", "peaked")):
        return True
    return zlib.crc32(case_id.encode("utf-8")) % 2 == 0


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "golden_cell" not in metafunc.fixturenames:
        return
    config = metafunc.config
    directory = goldens.locate(config.rootpath)
    if directory is None:
        reason = (f"golden files not found under {config.rootpath / 'fixtures'}: run from a source "
                  f"checkout or set ${goldens.ENV_DIR} to the folder holding {goldens.MANIFEST_NAME}")  # fmt: skip
        metafunc.parametrize("golden_cell", [pytest.param(None, id="goldens-missing",
                                                          marks=pytest.mark.skip(reason=reason))])  # fmt: skip
        return
    manifest = goldens.read_manifest(directory)
    sel = selection(config)
    quick = sel.tier == "quick"
    params = []
    for fw in sel.frameworks:
        adapter = REGISTRY[fw]
        for device in sel.devices:
            marks = _cell_marks(fw, device)  # skip if absent, gpu mark, one xdist group per framework
            for case in manifest["cases"]:
                if quick and not _in_quick_tier(case["id"]):
                    continue
                if case["dtype"] in sel.dtypes and case["dtype"] in adapter.dtypes:
                    cell = GoldenCell(fw, device, case["id"], case["dtype"], directory)
                    params.append(pytest.param(cell, id=f"{fw}-{device}-{case['id']}", marks=marks))
    metafunc.parametrize("golden_cell", params)


@functools.lru_cache(maxsize=2)
def _load(directory: Path) -> dict[str, goldens.Golden]:
    return {g.id: g for g in goldens.load(directory)}


# ------------------------------------------------------------------------- expectations


def expected(g: goldens.Golden, api: Api, fw: str, compute: str, ex: Exact | None = None) -> GoldenExpected:
    """What ``api`` must return per row and in total for golden ``g`` (its spec's ``golden_expected``;
    raises for a spec without one); ``ex``: ``Exact.of`` the golden's inputs, when the caller has it."""
    ex = ex if ex is not None else Exact.of(g.teacher, g.student, g.temperature)
    return apis.spec(api).golden_expected(g, ex, api, fw, compute)


# ---------------------------------------------------------------------------------- runs


def _result(fw: str, api: Api, red: str, g: goldens.Golden, device: str) -> CheckResult:
    return CheckResult(fw, api.id + TAG, red, g.dtype, device, "contiguous", g.id, 0)


def judge(adapter: Adapter, api: Api, g: goldens.Golden, device: str, ex: Exact | None = None) -> list[CheckResult]:
    """Run ``api`` on the golden's exact inputs and judge every reduction against the golden
    (``ex``: ``Exact.of`` those inputs, shared by the framework's APIs)."""
    compute = adapter.compute_dtype(api, g.dtype)
    exp = expected(g, api, adapter.name, compute, ex)
    plan = apis.spec(api).golden_reductions(api, g.shape)
    teacher, student = g.typed()
    outputs = adapter.run(dataclasses.replace(api, reductions=tuple(plan)), teacher, student,
                          g.temperature, device, "contiguous")  # fmt: skip
    results = []
    for red, (to_rows, divisor) in plan.items():
        res = _result(adapter.name, api, red, g, device)
        res.differences = list(exp.notes)
        for problem in exp.problems:
            res.fail(problem)
        value = np.asarray(outputs[red].value, np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            if to_rows is not None:
                obs = to_rows(value)
                ref = exp.rows
                if exp.either_inf is not None:
                    ref = np.where(exp.either_inf & (obs == np.inf), np.inf, ref)
                compare(res, obs, ref, exp.tol_rows)
            else:
                compare(res, value, np.asarray(exp.total / divisor), exp.tol_total / divisor)
        if outputs[red].dtype != compute:
            res.fail(f"result dtype {outputs[red].dtype}, expected {compute}")
        results.append(res)
    return results


def _message(cell: GoldenCell, g: goldens.Golden, results: list[CheckResult]) -> str:
    bad = [r for r in results if not r.ok]
    lines = [f"{cell.framework} on golden {g.id} (T={g.temperature:g}, shape {g.shape}, {cell.device}): "
             f"{len(bad)} of {len(results)} checks failed against the mpmath reference"]  # fmt: skip
    for r in bad:
        lines.append(f"  {r.api} reduction={r.reduction}: max abs {r.max_abs:.3g}, max rel {r.max_rel:.3g}, "
                     f"tolerance {r.tolerance:.3g}")  # fmt: skip
        lines += [f"    - {p}" for p in r.problems] + [f"    note: {d}" for d in r.differences]
    lines.append(f"  repro: pytest --pyargs klparity.suite.test_goldens -k '{cell.framework}-{cell.device}-{g.id}'")
    return "\n".join(lines)


def test_goldens(golden_cell: GoldenCell, request: pytest.FixtureRequest) -> None:
    """Every API of the framework reproduces the golden KL rows and batch reduction (and, for torch,
    the golden gradient) within the derived tolerance, or differs exactly as documented."""
    cell = golden_cell
    adapter = REGISTRY[cell.framework]
    if cell.device not in adapter.devices():
        pytest.skip(f"no {cell.device} device visible to {cell.framework}")
    g = _load(cell.directory)[cell.golden]
    reason = overflow_reason(g.teacher, g.student, g.temperature, g.dtype)
    if reason:
        pytest.skip(reason)
    results: list[CheckResult] = []
    ex = Exact.of(g.teacher, g.student, g.temperature)
    specs = []
    for api in (a for a in adapter.apis(g.dtype) if apis.spec(a).has_goldens() and not a.missing()):
        results += judge(adapter, api, g, cell.device, ex)
        if apis.spec(api) not in specs:
            specs.append(apis.spec(api))
    if cell.device == "cpu":  # each spec's gradient check, once per framework
        results += [r for r in (s.golden_gradient(g, ex) for s in specs) if r is not None]
    record(results)
    if not all(r.ok for r in results):
        pytest.fail(_message(cell, g, results), pytrace=False)
