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
import math
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from numpy.typing import NDArray

from klparity import goldens, oracle, tolerances
from klparity.checks import CheckResult, Exact, compare, overflow_reason
from klparity.dtypes import dtype_info, round_to, widen
from klparity.frameworks import REGISTRY, Adapter, Api
from klparity.plugin import _cell_marks, record, selection

F64 = NDArray[np.float64]
pytestmark = pytest.mark.equivalence

#: Suffix of the API id in reports, so golden checks form their own rows of the verdict matrix.
TAG = " vs goldens"


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


@dataclasses.dataclass
class Expected:
    """Reference rows for one API on one golden, and what differs from the golden and why."""

    rows: F64
    tol_rows: F64
    total: float  #: sum of the expected rows (the golden's kl_sum where every row is the golden's)
    tol_total: float
    notes: list[str]
    problems: list[str] = dataclasses.field(default_factory=list)  #: failures found while deriving
    #: rows that may be +inf instead (the value depends on whether the backend flushes subnormals)
    either_inf: NDArray[np.bool_] | None = None


def _with_nan_rows(g: goldens.Golden, nan_rows: NDArray[np.bool_]) -> tuple[F64, float]:
    rows = np.where(nan_rows, np.nan, g.kl)
    return rows, (math.nan if nan_rows.any() else g.kl_sum)


def _log_space(g: goldens.Golden, ex: Exact, api: Api, fw: str, compute: str) -> Expected:
    """torch and optax: log q from log_softmax, the target p or log p; NaN quirks on zero targets."""
    if api.semantics == "torch":
        log_target = bool(api.option("log_target", False))
    else:
        log_target = api.entry.endswith("with_log_targets")
    zero_p = ex.lp == -np.inf
    quirk = zero_p if log_target else zero_p & (ex.lq == -np.inf)
    nan_rows = quirk.any(axis=-1)
    rows, total = _with_nan_rows(g, nan_rows)
    bud = tolerances.budget(framework=fw, input_dtype=g.dtype, compute_dtype=compute, p=ex.p, q=ex.q,
                            zt=ex.zt, zs=ex.zs, student_is_probability=False, log_p=ex.lp,
                            log_q=ex.lq)  # fmt: skip
    where = "zero targets" if log_target else "classes masked on both sides"
    notes = [f"{int(nan_rows.sum())} rows NaN by the documented 0 * -inf on {where}"] if nan_rows.any() else []
    return Expected(rows, bud.rows(), total, bud.total(), notes)


def _rel_entr(g: goldens.Golden, ex: Exact, fw: str, compute: str) -> Expected:
    """sum(rel_entr(p, q)) on probabilities: +inf where q_j underflows to 0 in the dtype but p_j does
    not, either +inf or the golden where q_j is subnormal there (flush-to-zero decides), and +inf
    (not NaN) on a NaN row: JAX's rel_entr has no NaN branch."""
    p_c, q_c = widen(round_to(ex.p, compute)), widen(round_to(ex.q, compute))
    nan_rows = np.isnan(g.kl)
    inf_rows = ((p_c > 0) & (q_c == 0)).any(axis=-1) & ~nan_rows
    either = ((p_c > 0) & (q_c < dtype_info(compute).smallest_normal)).any(axis=-1) & ~nan_rows & ~inf_rows
    rows = np.where(inf_rows | nan_rows, np.inf, g.kl)
    bud = tolerances.budget(framework=fw, input_dtype=g.dtype, compute_dtype=compute, p=ex.p, q=ex.q,
                            zt=ex.zt, zs=ex.zs, student_is_probability=True, log_p=ex.lp, log_q=ex.lq)  # fmt: skip
    notes = []
    if inf_rows.any() or either.any():
        notes.append(f"jax.rel_entr_underflow_inf: {int(inf_rows.sum())} rows +inf where q underflows {compute} "
                     f"and p does not, {int(either.sum())} rows +inf or exact (subnormal q)")  # fmt: skip
    if nan_rows.any():
        notes.append(f"jax.rel_entr_nan_is_inf: {int(nan_rows.sum())} NaN rows come out +inf")
    return Expected(rows, bud.rows(), float(np.sum(rows)), bud.total(), notes, either_inf=either)


def _keras(g: goldens.Golden, ex: Exact, fw: str, compute: str) -> Expected:
    """Golden rows where clipping and float16 overflow are inactive, the clipped formula elsewhere."""
    eps = float(round_to(np.asarray(oracle.KERAS_EPSILON), compute))
    cmax = dtype_info(compute).max
    pt, qt = np.clip(ex.p, eps, 1.0), np.clip(ex.q, eps, 1.0)
    with np.errstate(invalid="ignore"):
        overflow = (pt / qt > cmax).any(axis=-1)
    clipped = ((ex.p < eps) | (ex.q < eps)).any(axis=-1) | overflow
    formula = oracle.keras_kl_divergence(ex.p, ex.q, reduction="none", epsilon=eps, compute_max=cmax)
    rows = np.where(clipped & ~np.isnan(g.kl), formula, g.kl)
    bud = tolerances.budget(framework=fw, input_dtype=g.dtype, compute_dtype=compute, p=pt, q=qt,
                            zt=ex.zt, zs=ex.zs, student_is_probability=True)  # fmt: skip
    total = g.kl_sum if not clipped.any() else math.fsum(np.ravel(rows))
    notes, problems = [], []
    if clipped.any():
        sel = clipped & np.isfinite(g.kl) & ~overflow
        with np.errstate(invalid="ignore"):
            gap = np.abs(formula - g.kl)[sel]
        bound = oracle.keras_clip_gap_bound(ex.p, ex.q, epsilon=eps)[sel]
        over = ~(gap <= bound + bud.rows()[sel])  # NaN counts as over
        if over.any():
            problems.append(f"the clipped formula is {float(np.max(gap[over])):.3g} from the golden, "
                            f"beyond the derived clipping bound {float(np.max(bound[over])):.3g}")  # fmt: skip
        largest = float(np.max(gap, initial=0.0))
        notes.append(f"{int(clipped.sum())} of {clipped.size} rows clipped (or float16 overflow): judged "
                     f"against the clipped formula, largest gap to the golden {largest:.3g}")  # fmt: skip
    return Expected(rows, bud.rows(), total, bud.total(), notes, problems)


def expected(g: goldens.Golden, api: Api, fw: str, compute: str, ex: Exact | None = None) -> Expected:
    """What ``api`` must return per row and in total for golden ``g`` (raises for unknown semantics);
    ``ex``: ``Exact.of`` the golden's inputs, when the caller has it already."""
    ex = ex if ex is not None else Exact.of(g.teacher, g.student, g.temperature)
    if api.semantics == "keras":
        return _keras(g, ex, fw, compute)
    if api.semantics == "optax" and api.entry.endswith("rel_entr"):
        return _rel_entr(g, ex, fw, compute)
    if api.semantics in ("torch", "optax"):
        return _log_space(g, ex, api, fw, compute)
    raise NotImplementedError(f"no golden expectations for API semantics {api.semantics!r}")


# ---------------------------------------------------------------------------------- runs


def _reductions(api: Api, shape: tuple[int, ...]) -> dict[str, tuple[Callable[[F64], F64] | None, int]]:
    """Reduction label -> (how its output becomes per-row values, or None for a batch scalar; the
    divisor of the expected total for that scalar: torch's batchmean divides by ``input.size(0)``,
    which is C for 1-D input, Keras's sum_over_batch_size by the number of rows)."""
    rows = max(math.prod(shape[:-1]), 1)
    if api.semantics == "torch":
        return {"none": (lambda v: np.sum(v, axis=-1), 1), "batchmean": (None, shape[0])}
    if api.semantics == "keras" and "sum_over_batch_size" in api.reductions and len(shape) > 1:
        return {"none": (lambda v: v, 1), "sum_over_batch_size": (None, rows)}
    return {"none": (lambda v: v, 1)}


def _result(fw: str, api: Api, red: str, g: goldens.Golden, device: str) -> CheckResult:
    return CheckResult(fw, api.id + TAG, red, g.dtype, device, "contiguous", g.id, 0)


def judge(adapter: Adapter, api: Api, g: goldens.Golden, device: str, ex: Exact | None = None) -> list[CheckResult]:
    """Run ``api`` on the golden's exact inputs and judge every reduction against the golden
    (``ex``: ``Exact.of`` those inputs, shared by the framework's APIs)."""
    compute = adapter.compute_dtype(api, g.dtype)
    exp = expected(g, api, adapter.name, compute, ex)
    plan = _reductions(api, g.shape)
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


def torch_gradient(g: goldens.Golden, ex: Exact | None = None) -> CheckResult:
    """Autograd of ``kl_div(log_softmax(s / T), softmax(t / T), reduction='sum')`` w.r.t. s."""
    import torch

    api = Api("torch", "torch.autograd.grad", "torch", ("sum",), (("of", "kl_div(reduction=sum)"),))
    res = _result("torch", api, "d/d student", g, "cpu")
    tdtype = getattr(torch, g.dtype)
    # float64 -> dtype is exact: the golden values are representable in dtype
    t = torch.from_numpy(g.teacher.copy()).to(tdtype)
    s = torch.from_numpy(g.student.copy()).to(tdtype).requires_grad_(True)
    fn = torch.nn.functional
    loss = fn.kl_div(fn.log_softmax(s / g.temperature, dim=-1), fn.softmax(t / g.temperature, dim=-1),
                     reduction="sum")  # fmt: skip
    loss.backward()  # type: ignore[no-untyped-call]
    assert s.grad is not None
    grad = s.grad.to(torch.float64).numpy()
    ex = ex if ex is not None else Exact.of(g.teacher, g.student, g.temperature)
    tol = tolerances.golden_gradient(g.dtype, g.temperature, ex.p, ex.q, ex.lp, ex.lq, ex.zt, ex.zs)
    compare(res, grad, g.grad, tol)
    if s.grad.dtype != tdtype:
        res.fail(f"gradient dtype {s.grad.dtype}, expected {tdtype}")
    return res


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
    for api in adapter.apis(g.dtype):
        results += judge(adapter, api, g, cell.device, ex)
    if cell.framework == "torch" and cell.device == "cpu":
        results.append(torch_gradient(g, ex))
    record(results)
    if not all(r.ok for r in results):
        pytest.fail(_message(cell, g, results), pytrace=False)
