"""Scale tier (``--klparity-scale``): KL divergence at LLM-distillation sizes, judged like every other cell.

Vocabularies of C = 128256 and 256000 classes over (B, S) = (8, 261) and (8, 131) tokens: up to 2**28
elements, 1 GiB per float32 array. Nothing here may hold a float64 copy of an input (2 GiB each), so:

* **data** is made in row blocks directly in the tested dtype: N(0, 3²) logits as
  ``np.random.default_rng(crc32(id) + shift).standard_normal(dtype=float32)`` written into the array
  (bfloat16: through a one-block float32 buffer), teacher then student; the stream does not depend on
  the block size;
* **the framework** gets those arrays without a copy (torch shares their memory; bfloat16 through an
  int16 view) and does what the adapters do: softmax / log_softmax of logits / T, then the loss, for
  the reductions checked (each adapter's ``run`` would widen its inputs to float64 first);
* **the reference** is computed per row block with the very functions ``forward.run_cell`` uses
  (``exact.exact_of``, ``tolerances.budget``, the per-semantics expectation functions, evaluated
  for ``reduction='sum'`` on the block), and the blocks' sums are combined exactly (``math.fsum``);
  the tolerance of the total comes from ``BudgetTotal``, which charges the summation of all N
  elements (see its docstring). Results are judged with ``judge_mod.compare`` into ``CheckResult``s.

Before a cell runs, its peak memory is estimated and compared with ``MemAvailable``; cells run one
at a time per machine (a file lock), so xdist workers or two developers cannot stack them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import tempfile
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from klparity import apis
from klparity.engine import grid
from klparity.engine import judge as judge_mod
from klparity.frameworks import REGISTRY
from klparity.model import Api, CheckResult, Exact, Expectation, Output
from klparity.numerics.cases import make_id
from klparity.numerics.dtypes import dtype_info, widen
from klparity.numerics.errormodel import Budget
from klparity.numerics.exact import exact_of
from klparity.numerics.oracle import _oracle_threads

log = logging.getLogger(__name__)

GIB: Final = 2**30
#: Suffix of the API id in reports: scale checks form their own rows of the verdict matrix.
TAG: Final = " at scale"
#: Logits are N(0, LOGIT_SCALE²), as the quick tier's ``gauss3`` cases.
LOGIT_SCALE: Final = 3.0
#: One float64 block array of the reference holds about this many bytes (rows = BLOCK_BYTES / 8C).
BLOCK_BYTES: Final = 1 << 22
#: Block-sized float64 arrays alive at once in one reference worker (Exact, budget, expectations;
#: measured with tracemalloc: 26 for a torch + Keras float32 sweep), for the memory estimate.
ORACLE_BLOCK_ARRAYS: Final = 32
#: Headroom on top of the estimate (interpreter, framework libraries, allocator slack).
MARGIN_BYTES: Final = GIB // 2
#: The reference's peak memory, inputs included, must stay within this multiple of the inputs' size.
ORACLE_MEMORY_RATIO: Final = 1.5
DEVICES: Final = ("cpu",)
DISABLED_REASON: Final = (
    "scale tier (C = 128256 and 256000, up to 2**28 elements, up to ~12 GiB of memory and minutes per "
    "cell): run with --klparity-scale"
)


@dataclass(frozen=True)
class ScaleCase:
    """N(0, scale²) teacher and student logits of one shape; id and seed as ``klparity.numerics.cases``."""

    shape: tuple[int, ...]
    temperature: float
    scale: float = LOGIT_SCALE

    @property
    def id(self) -> str:
        """e.g. ``gauss3_8x261x128256_T1``."""
        return make_id("gauss", self.scale, self.shape, self.temperature)

    def seed(self, shift: int = 0) -> int:
        """crc32 of the id, shifted by ``--klparity-seed`` (mod 2**32)."""
        return (zlib.crc32(self.id.encode("utf-8")) + shift) % 2**32

    @property
    def classes(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def size(self) -> int:
        return math.prod(self.shape)


#: C = 128256 (Llama 3) at T = 1 and C = 256000 (Gemma) at T = 2, each just under 2**28 elements.
CASES: Final = (ScaleCase((8, 261, 128256), 1.0), ScaleCase((8, 131, 256000), 2.0))

def scale_apis() -> tuple[tuple[str, Api, tuple[str, ...]], ...]:
    """The APIs the scale tier checks: (framework, API, dtypes), from every adapter's ``scale_apis``."""
    return tuple((name, api, dtypes) for name, adapter in REGISTRY.items() for api, dtypes in adapter.scale_apis)


@dataclass(frozen=True)
class ScaleCell:
    """One scale check: (framework, API, case, dtype, device, layout), ids as ``forward.Cell``."""

    framework: str
    api: Api
    case: ScaleCase
    dtype: str
    device: str = "cpu"
    layout: str = "contiguous"

    @property
    def id(self) -> str:
        return f"{self.api.id}-{self.dtype}-{self.device}-{self.layout}-{self.case.id}"

    @property
    def compute(self) -> str:
        """Dtype the API computes in (the adapter says; no framework import)."""
        return REGISTRY[self.framework].compute_dtype(self.api, self.dtype)


def cells(sel: grid.Selection, cases: Sequence[ScaleCase] = CASES) -> list[ScaleCell]:
    """The scale cells of a selection; torch first (TensorFlow keeps its peak memory once it ran)."""
    out = []
    for fw, api, dtypes in scale_apis():
        if fw not in sel.frameworks:
            continue
        for case in cases:
            for dtype in dtypes:
                for device in DEVICES:
                    if dtype in sel.dtypes and device in sel.devices:
                        out.append(ScaleCell(fw, api, case, dtype, device))
    return out


# -------------------------------------------------------------------------------------------- data


def block_rows(classes: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Rows per block: one float64 block array of ``classes`` columns holds about ``block_bytes``."""
    return max(1, block_bytes // (8 * classes))


def logits(
    case: ScaleCase, dtype: str, shift: int = 0, rows: int | None = None
) -> tuple[NDArray[np.generic], NDArray[np.generic]]:
    """(teacher, student) logits in ``dtype``, made ``rows`` rows at a time, never widened.

    float32 values are drawn straight into the output; other dtypes round the same float32 values
    through a one-block buffer. The result does not depend on ``rows`` (the generator's stream is
    sequential), so a cell's data is the same whatever block size made it.
    """
    rng = np.random.default_rng(case.seed(shift))
    target = dtype_info(dtype).numpy
    step = rows or block_rows(case.classes)
    scale = np.float32(case.scale)
    out = []
    for _ in range(2):
        arr = np.empty(case.shape, dtype=target)
        flat = arr.reshape(-1, case.classes)
        buf = None if target == np.float32 else np.empty((step, case.classes), np.float32)
        for start in range(0, case.rows, step):
            stop = min(start + step, case.rows)
            dst = flat[start:stop] if buf is None else buf[: stop - start]
            rng.standard_normal(dtype=np.float32, out=dst)
            np.multiply(dst, scale, out=dst)
            if buf is not None:
                flat[start:stop] = dst.astype(target)
        out.append(arr)
    return out[0], out[1]


# ------------------------------------------------------------------------------------ tolerance


@dataclass(frozen=True)
class BudgetTotal:
    """The error budget of one sum over all N elements, assembled from the budgets of its row blocks.

    ``Budget.total()`` bounds a sum over the elements *it* holds: ``(coeff_elem + log2(n) u_sum)
    sum_j e_j + sum_j floor_j``, with log2(n) the roundings of a pairwise / cascade sum over its n
    elements. The framework sums all N elements of the tensor in one reduction, so the bound of the
    total is that formula over the whole array, with log2(N): adding the blocks' own totals would
    charge only log2(n_block) roundings, i.e. (log2 N - log2 n_block) u_sum sum_j e_j too little.
    The formula is linear in sum_j e_j and sum_j floor_j, and every other ingredient (coefficients,
    u_sum, reason) is the same for every block of one case, framework and dtype. So a block
    contributes just its two sums (``of``); ``combine`` adds them with ``math.fsum`` (exact to one
    rounding, whatever the number or order of blocks); ``total`` applies ``Budget``'s own formula
    with the full N. The result equals ``budget(...)`` of the whole array ``.total()`` to float64
    rounding (``tests/unit/test_scale.py``).
    """

    scale_parts: tuple[float, ...]  #: sum_j e_j of each block
    floor_parts: tuple[float, ...]  #: sum_j floor_j of each block
    size: int  #: elements summed, N
    coeff_elem: float
    u_sum: float
    reason: str

    @classmethod
    def of(cls, b: Budget) -> BudgetTotal:
        """One block's contribution (two floats: the block's arrays are not kept)."""
        return cls((float(np.sum(b.elem_scale)),), (float(np.sum(b.floor)),), int(b.elem_scale.size),
                   b.coeff_elem, b.u_sum, b.reason)  # fmt: skip

    @classmethod
    def combine(cls, parts: Sequence[BudgetTotal]) -> BudgetTotal:
        """The budget of the union of ``parts``; they must share one error model."""
        first = parts[0]
        for p in parts[1:]:
            if (p.coeff_elem, p.u_sum, p.reason) != (first.coeff_elem, first.u_sum, first.reason):
                raise ValueError("blocks of one sum must share one error model (coefficients and reason)")
        return cls(tuple(x for p in parts for x in p.scale_parts), tuple(x for p in parts for x in p.floor_parts),
                   sum(p.size for p in parts), first.coeff_elem, first.u_sum, first.reason)  # fmt: skip

    def total(self) -> float:
        """Tolerance of the sum over all ``size`` elements (``Budget``'s formula, log2 of the full N)."""
        whole = Budget(np.empty(0), np.empty(0), self.coeff_elem, self.u_sum, self.reason)
        scale, floor = np.float64(_fsum(self.scale_parts)), np.float64(_fsum(self.floor_parts))
        return float(whole._summed(scale, floor, self.size))


def _fsum(xs: Sequence[float]) -> float:
    """Correctly rounded sum; IEEE semantics (inf, NaN) when a term is not finite."""
    if all(math.isfinite(x) for x in xs):
        return math.fsum(xs)
    with np.errstate(invalid="ignore", over="ignore"):
        return float(np.sum(np.asarray(xs, np.float64)))


# ------------------------------------------------------------------------------------ reference


@dataclass(frozen=True)
class Spec:
    """One API to build a reference for: framework, API, compute dtype."""

    framework: str
    api: Api
    compute: str


@dataclass(frozen=True)
class _Block:
    """What one row block contributes to one API's reference: its ``reduction='sum'`` expectation."""

    value: float
    exact: float
    gap: float | None  #: None: the spec derives no bound on the gap (the formula must equal the exact KL)
    nan_allowed: bool | None  #: None: the spec never allows NaN for an underflow
    inf_allowed: bool | None
    budget: BudgetTotal
    known: tuple[str, ...]


@dataclass(frozen=True)
class Reference:
    """The expectations of every reduction of one API on the whole array, and their context."""

    expected: dict[str, Expectation]
    known: tuple[str, ...]  #: documented differences whose condition holds somewhere
    reason: str  #: the tolerance's reason


def divisor(api: Api, reduction: str, shape: tuple[int, ...]) -> tuple[str, int]:
    """(reduction name, divisor) of a reduction label on the total over ``shape`` (the API spec's
    ``scale_divisor``; checked against its ``reduce`` in the unit tests). Unreduced results are not
    checked at scale."""
    if len(shape) < 2:
        raise ValueError(f"the scale tier needs a batch axis; got shape {shape}")
    return apis.spec(api).scale_divisor(reduction, shape)


def _block(ex: Exact, spec: Spec, dtype: str, budgets: dict[tuple[object, ...], Budget]) -> _Block:
    """One block's ``'sum'`` expectation of one API, from the functions ``forward.run_cell`` uses."""
    api = replace(spec.api, reductions=("sum",))
    api_spec = apis.spec(spec.api)
    exps, bud = api_spec.expectations_shared(api, ex, dtype, spec.compute, spec.framework, budgets)
    exp = exps["sum"]
    return _Block(
        value=float(exp.value), exact=float(exp.exact),
        gap=None if exp.gap_bound is None else float(exp.gap_bound),
        nan_allowed=None if exp.nan_allowed is None else bool(np.any(exp.nan_allowed)),
        inf_allowed=None if exp.inf_allowed is None else bool(np.any(exp.inf_allowed)),
        budget=BudgetTotal.of(bud), known=tuple(api_spec.known_differences(spec.api, ex, spec.compute)),
    )  # fmt: skip


def _any(flags: Sequence[bool | None]) -> NDArray[np.bool_] | None:
    """Whether any block allows it (None when no block's spec has the notion)."""
    kept = [f for f in flags if f is not None]
    return np.asarray(any(kept)) if kept else None


def _combine(spec: Spec, blocks: Sequence[_Block], shape: tuple[int, ...]) -> Reference:
    """Every reduction of one API on the whole array, from its blocks (as ``checks`` would build it)."""
    api_spec = apis.spec(spec.api)
    bud = BudgetTotal.combine([b.budget for b in blocks])
    value, exact = _fsum([b.value for b in blocks]), _fsum([b.exact for b in blocks])
    gaps = [b.gap for b in blocks if b.gap is not None]
    gap, tol = (_fsum(gaps) if gaps else None), bud.total()
    nan_any, inf_any = _any([b.nan_allowed for b in blocks]), _any([b.inf_allowed for b in blocks])
    expected = {}
    for red in spec.api.reductions:
        name, div = divisor(spec.api, red, shape)
        expected[red] = Expectation(
            value=np.asarray(value / div), tolerance=tol / div, exact=np.asarray(exact / div),
            gap_bound=None if gap is None else gap / div, dtype=spec.compute,
            must_warn=api_spec.warning(name), inf_allowed=inf_any, nan_allowed=nan_any,
        )  # fmt: skip
    known = tuple(dict.fromkeys(name for b in blocks for name in b.known))
    return Reference(expected, known, bud.reason)


def reference(
    teacher: NDArray[np.generic],
    student: NDArray[np.generic],
    temperature: float,
    specs: Sequence[Spec],
    *,
    dtype: str,
    rows: int | None = None,
    workers: int | None = None,
) -> dict[Spec, Reference]:
    """The reference and tolerance of every reduction of each API in ``specs``, block by block.

    ``teacher``/``student`` are the logits in ``dtype``, exactly as the framework got them. Each
    block of ``rows`` rows is widened to float64 alone; the working memory is a few dozen block
    arrays per worker (``workers`` threads, default the oracle's: all cores, or the OpenMP cap).
    """
    c = teacher.shape[-1]
    t2, s2 = teacher.reshape(-1, c), student.reshape(-1, c)
    step = rows or block_rows(c)

    def work(start: int) -> list[_Block]:
        tb, sb = widen(t2[start : start + step]), widen(s2[start : start + step])
        ex = exact_of(tb, sb, temperature)
        budgets: dict[tuple[object, ...], Budget] = {}
        return [_block(ex, spec, dtype, budgets) for spec in specs]

    starts = range(0, t2.shape[0], step)
    n_workers = workers or _oracle_threads()
    if n_workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            per_block = list(pool.map(work, starts))
    else:
        per_block = [work(s) for s in starts]
    return {spec: _combine(spec, [b[i] for b in per_block], teacher.shape) for i, spec in enumerate(specs)}


# ---------------------------------------------------------------------------------------- memory


def mem_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _status(key: str) -> int | None:
    """A ``VmRSS``-like line of /proc/self/status in bytes, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) so the next reading covers what follows; False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


#: Bytes a framework's allocator kept after a scale call in this process (TensorFlow's oneDNN pool):
#: the next call of that framework reuses them, so they count as available to it.
_POOLED: dict[str, int] = {}


def estimate_bytes(cell: ScaleCell, workers: int | None = None) -> int:
    """Peak memory of one scale cell: inputs + framework temporaries + reference blocks + margin."""
    n = cell.case.size
    inputs = 2 * n * dtype_info(cell.dtype).numpy.itemsize
    framework = REGISTRY[cell.framework].scale_arrays * n * dtype_info(cell.compute).numpy.itemsize
    step = block_rows(cell.case.classes)
    oracle = (workers or _oracle_threads()) * ORACLE_BLOCK_ARRAYS * 8 * step * cell.case.classes
    return int(inputs + framework + oracle + MARGIN_BYTES)


def skip_reason(cell: ScaleCell) -> str | None:
    """Why a scale cell cannot run here and now (framework, device, memory), or None."""
    adapter = REGISTRY[cell.framework]
    if not adapter.available():
        return adapter.missing_reason()
    if cell.device not in adapter.devices():  # also imports the framework with the suite's thread cap
        return f"no {cell.device} device visible to {cell.framework}"
    avail = mem_available()
    if avail is None:
        return None  # no /proc/meminfo: the user asked for the tier, run it
    avail += _POOLED.get(cell.framework, 0)
    need = estimate_bytes(cell)
    if need > avail:
        return (f"{cell.case.id} in {cell.dtype} with {cell.framework} needs ~{need / GIB:.1f} GiB, "
                f"{avail / GIB:.1f} GiB available (MemAvailable)")  # fmt: skip
    return None


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Hold the machine-wide scale lock (a ``flock`` in the temp dir): one scale cell at a time."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(os.path.join(tempfile.gettempdir(), "klparity-scale.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------ driver


@dataclass
class ScaleRun:
    """A scale cell's verdicts and what it cost."""

    results: list[CheckResult]
    seconds: dict[str, float]  #: data, framework, reference (0 when reused), judge
    input_bytes: int
    estimate_bytes: int
    framework_peak_bytes: int | None  #: peak RSS above the inputs while the framework ran
    cell_peak_rss: int | None  #: the process's peak RSS from the framework call to the end
    oracle_peak_bytes: int | None  #: tracemalloc peak of the reference above the inputs (None: reused)
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  #: per reduction: value, reference, ...

    @property
    def oracle_memory_ratio(self) -> float | None:
        """(inputs + the reference's peak) / inputs; must stay within ``ORACLE_MEMORY_RATIO``."""
        if self.oracle_peak_bytes is None:
            return None
        return (self.input_bytes + self.oracle_peak_bytes) / self.input_bytes

    def summary(self) -> str:
        """One line: times, tightness per reduction, memory."""
        tight = ", ".join(f"{r.reduction} {r.tightness:.3g}" for r in self.results)
        rel = ", ".join(f"{red} {st['tolerance'] / abs(st['reference']):.2g}" for red, st in self.stats.items()
                        if st["reference"])  # fmt: skip
        differs = {r.reduction for r in self.results if r.differences}  # a documented difference applies
        gap = ", ".join(f"{red} {st['reference']:.6g} vs exact {st['exact']:.6g}" for red, st in self.stats.items()
                        if red in differs)  # fmt: skip
        secs = ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())
        ratio = self.oracle_memory_ratio
        return (f"time [s]: {secs}; err/tol: {tight}; tol/|ref|: {rel}; "
                + (f"API formula: {gap}; " if gap else "")
                + f"framework peak {_gib(self.framework_peak_bytes)} above "
                f"the inputs ({_gib(self.input_bytes)}), estimate {_gib(self.estimate_bytes)} in all; "
                f"process peak RSS {_gib(self.cell_peak_rss)}; reference peak "
                + ("reused" if ratio is None else f"{ratio:.3f}x the inputs"))  # fmt: skip


def _gib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / GIB:.2f} GiB"


def _traced(fn: Callable[[], dict[Spec, Reference]]) -> tuple[dict[Spec, Reference], int]:
    """Run ``fn`` under tracemalloc; its result and the peak of traced memory above the start."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    try:
        result = fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()
    return result, peak


#: References already built in this process: (case id, shape, T, dtype, shift, rows, specs) -> per API.
_REFERENCES: dict[tuple[Any, ...], dict[Spec, Reference]] = {}


def specs_for(cell: ScaleCell, group: Sequence[ScaleCell] = ()) -> tuple[Spec, ...]:
    """The APIs whose references one sweep over ``cell``'s data builds: its own and its group's."""
    same = [c for c in (*group, cell) if (c.case, c.dtype) == (cell.case, cell.dtype)]  # group order: one key
    return tuple(dict.fromkeys(Spec(c.framework, c.api, c.compute) for c in same))


def run_cell(
    cell: ScaleCell,
    shift: int = 0,
    *,
    group: Sequence[ScaleCell] = (),
    rows: int | None = None,
    workers: int | None = None,
) -> ScaleRun:
    """Run one scale cell and judge every reduction, as ``forward.run_cell`` does for the other tiers.

    ``group``: the other cells of the run; one sweep over the data builds the references of all those
    with the same case and dtype, and later cells reuse them. ``rows``: block rows (data and reference).
    """
    secs: dict[str, float] = {}
    clock = time.perf_counter()
    teacher, student = logits(cell.case, cell.dtype, shift, rows)
    secs["data"] = time.perf_counter() - clock
    input_bytes = teacher.nbytes + student.nbytes
    rss0, reset = _status("VmRSS"), _reset_peak_rss()
    clock = time.perf_counter()
    outputs = REGISTRY[cell.framework].run_scale(cell.api, teacher, student, cell.case.temperature)
    secs["framework"] = time.perf_counter() - clock
    hwm, rss1 = _status("VmHWM"), _status("VmRSS")
    fw_peak = hwm - rss0 if reset and hwm is not None and rss0 is not None else None
    if rss0 is not None and rss1 is not None:
        _POOLED[cell.framework] = max(_POOLED.get(cell.framework, 0), rss1 - rss0)
    specs = specs_for(cell, group)
    key = (cell.case.id, cell.case.shape, cell.case.temperature, cell.dtype, shift, rows, specs)
    clock = time.perf_counter()
    oracle_peak = None
    if key not in _REFERENCES:
        _REFERENCES[key], oracle_peak = _traced(lambda: reference(
            teacher, student, cell.case.temperature, specs, dtype=cell.dtype, rows=rows, workers=workers))  # fmt: skip
    ref = _REFERENCES[key][Spec(cell.framework, cell.api, cell.compute)]
    secs["reference"] = time.perf_counter() - clock
    clock = time.perf_counter()
    results = judge(cell, shift, ref, outputs)
    secs["judge"] = time.perf_counter() - clock
    end_hwm = _status("VmHWM") if reset else None
    stats = {red: {"value": float(np.asarray(outputs[red].value)), "reference": float(np.asarray(e.value)),
                   "exact": float(np.asarray(e.exact)), "tolerance": float(np.asarray(e.tolerance))}
             for red, e in ref.expected.items()}  # fmt: skip
    run = ScaleRun(results, secs, input_bytes, estimate_bytes(cell, workers), fw_peak, end_hwm, oracle_peak, stats)
    log.info("%s: %s", cell.id, run.summary())
    return run


def judge(cell: ScaleCell, shift: int, ref: Reference, outputs: dict[str, Output]) -> list[CheckResult]:
    """Judge each reduction's output against its reference with the one judge (``engine.judge``)."""

    def result(red: str) -> CheckResult:
        return CheckResult(cell.framework, cell.api.id + TAG, red, cell.dtype, cell.device, cell.layout,
                           cell.case.id, cell.case.seed(shift), reason=ref.reason)  # fmt: skip

    return judge_mod.judge(ref.expected, outputs, list(ref.known), result, cell.case.shape)


def repro(cell: ScaleCell, shift: int) -> str:
    """One-line command reproducing a scale cell outside pytest."""
    return f"python -m klparity.engine.scale --cell '{cell.id}' --seed {shift}"


def failure_message(cell: ScaleCell, shift: int, results: list[CheckResult]) -> str:
    """The suite's failure message (``judge_mod.failure_message``) for a scale cell, with its repro."""
    return judge_mod.failure_message(cell, shift, results, repro(cell, shift))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m klparity.engine.scale --cell ID [--seed N]`` runs one scale cell; ``--list`` lists them."""
    p = argparse.ArgumentParser(prog="python -m klparity.engine.scale", description=main.__doc__)
    p.add_argument("--cell", help="a scale cell id (see --list)")
    p.add_argument("--seed", type=int, default=0, help="seed shift, as --klparity-seed")
    p.add_argument("--list", action="store_true", help="list the scale cell ids")
    args = p.parse_args(argv)
    every = cells(grid.Selection())
    if args.list or not args.cell:
        print("\n".join(c.id for c in every))
        return 0
    cell = next((c for c in every if c.id == args.cell), None)
    if cell is None:
        print(f"unknown scale cell {args.cell!r}; see --list", file=sys.stderr)
        return 2
    with exclusive():
        reason = skip_reason(cell)
        if reason:
            print(f"skipped: {reason}")
            return 0
        run = run_cell(cell, args.seed)
    print(run.summary())
    if all(r.ok for r in run.results):
        return 0
    print(failure_message(cell, args.seed, run.results))
    return 1


if __name__ == "__main__":
    sys.exit(main())
