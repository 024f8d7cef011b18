"""The scale tier's machinery on a small instance: chunked references equal the unchunked ones.

``klparity.engine.scale`` builds references and tolerances block by block so that 2**28-element cases fit in
memory. Here the same code runs on C = 1000 over 2 x 8 rows with 3-row blocks (uneven, so the last
block is short) and is compared with what ``forward.run_cell`` computes on the whole arrays.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from klparity import apis
from klparity.apis.keras_kl_divergence import formula as keras_formula
from klparity.apis.torch_kl_div import formula as torch_formula
from klparity.engine import forward, grid, scale
from klparity.frameworks import REGISTRY
from klparity.model import Api, Expectation, Output
from klparity.numerics import exact
from klparity.numerics.cases import Case
from klparity.numerics.dtypes import round_to, widen
from klparity.numerics.errormodel import budget
from klparity.numerics.exact import exact_of

ROOT = Path(__file__).resolve().parents[2]
SMALL = scale.ScaleCase((2, 8, 1000), 1.0)
ROWS = 3  #: forced block size: 16 rows make blocks of 3, 3, 3, 3, 3, 1
REL = 1e-12  #: "equal to float64 rounding": sums of ~16000 terms in another order


def _small_cells() -> list[scale.ScaleCell]:
    return scale.cells(grid.Selection(), cases=(SMALL,))


def _unchunked(cell: scale.ScaleCell) -> dict[str, Expectation]:
    """``forward.run_cell``'s expectations on the whole arrays (the API spec's ``expectations``)."""
    t, s = scale.logits(cell.case, cell.dtype)
    ex = exact_of(widen(t), widen(s), cell.case.temperature)
    return apis.spec(cell.api).expectations(cell.api, ex, cell.dtype, cell.compute, cell.framework)[0]


def _chunked(cell: scale.ScaleCell) -> scale.Reference:
    t, s = scale.logits(cell.case, cell.dtype, rows=ROWS)
    spec = scale.Spec(cell.framework, cell.api, cell.compute)
    return scale.reference(t, s, cell.case.temperature, [spec], dtype=cell.dtype, rows=ROWS, workers=2)[spec]


def test_small_instance_covers_every_scale_api_and_dtype() -> None:
    small = {(c.framework, c.api, c.dtype) for c in _small_cells()}
    assert small == {(c.framework, c.api, c.dtype) for c in scale.cells(grid.Selection())}
    assert len(small) == 5


def test_logits_are_deterministic_and_independent_of_the_block_size() -> None:
    t1, s1 = scale.logits(SMALL, "float32", rows=ROWS)
    t2, s2 = scale.logits(SMALL, "float32", rows=16)
    assert t1.dtype == np.float32 and t1.shape == SMALL.shape
    assert np.array_equal(t1, t2) and np.array_equal(s1, s2) and not np.array_equal(t1, s1)
    assert SMALL.seed() == zlib.crc32(b"gauss3_2x8x1000_T1") and SMALL.seed(3) == SMALL.seed() + 3
    assert 2.9 < float(np.std(widen(t1))) < 3.1
    tb, sb = scale.logits(SMALL, "bfloat16", rows=5)
    assert tb.dtype.name == "bfloat16"
    assert np.array_equal(widen(tb), widen(round_to(widen(t1), "bfloat16")))
    assert np.array_equal(widen(sb), widen(round_to(widen(s1), "bfloat16")))
    assert not np.array_equal(scale.logits(SMALL, "float32", shift=1)[0], t1)


def test_budget_total_of_blocks_is_the_budget_of_the_whole_sum() -> None:
    t, s = scale.logits(SMALL, "float32")
    t2, s2 = widen(t).reshape(-1, 1000), widen(s).reshape(-1, 1000)

    def bud(rows: slice) -> Any:
        ex = exact_of(t2[rows], s2[rows], 1.0)
        return budget(framework="torch", input_dtype="float32", compute_dtype="float32", p=ex.p, q=ex.q, zt=ex.zt,
                      zs=ex.zs, student_is_probability=False, log_p=ex.lp, log_q=ex.lq)  # fmt: skip

    whole = bud(slice(None))
    blocks = [bud(slice(i, i + ROWS)) for i in range(0, 16, ROWS)]
    combined = scale.BudgetTotal.combine([scale.BudgetTotal.of(b) for b in blocks])
    assert combined.size == whole.elem_scale.size
    assert combined.total() == pytest.approx(whole.total(), rel=REL)
    # adding the blocks' own totals charges log2(n_block), not log2(N), summation roundings: too little
    naive = sum(b.total() for b in blocks)
    assert naive < whole.total() * (1 - 1e-3)


TORCH_API = Api("torch", "torch.nn.functional.kl_div", "torch", ("sum",))
KERAS_API = Api("tensorflow", "keras.losses.KLDivergence", "keras", ("sum",))


def test_divisors_are_the_oracle_reductions() -> None:
    pw = np.random.default_rng(0).random((2, 3, 5))
    for red in ("sum", "mean", "batchmean", "default"):
        name, div = scale.divisor(TORCH_API, red, pw.shape)
        assert float(torch_formula.torch_reduce(pw, name)) == pytest.approx(float(np.sum(pw)) / div, rel=REL)
    rows = pw.sum(axis=-1)
    for red in ("sum", "sum_over_batch_size", "default"):
        name, div = scale.divisor(KERAS_API, red, pw.shape)
        assert float(keras_formula.keras_reduce(rows, name)) == pytest.approx(float(np.sum(rows)) / div, rel=REL)
    with pytest.raises(ValueError, match="not checked at scale"):
        scale.divisor(TORCH_API, "none", pw.shape)


@pytest.mark.parametrize("cell", _small_cells(), ids=lambda c: c.id)
def test_chunked_reference_and_tolerance_equal_the_unchunked_ones(cell: scale.ScaleCell) -> None:
    whole, ref = _unchunked(cell), _chunked(cell)
    assert set(ref.expected) == set(whole) == set(cell.api.reductions)
    for red, exp in whole.items():
        got = ref.expected[red]
        assert float(got.value) == pytest.approx(float(exp.value), rel=REL)
        assert float(got.exact) == pytest.approx(float(exp.exact), rel=REL)
        assert float(got.tolerance) == pytest.approx(float(exp.tolerance), rel=REL)
        if exp.gap_bound is None:
            assert got.gap_bound is None
        else:
            assert got.gap_bound is not None and float(got.gap_bound) == pytest.approx(float(exp.gap_bound), rel=REL)
        assert (got.dtype, got.must_warn) == (exp.dtype, exp.must_warn)
        for attr in ("nan_allowed", "inf_allowed"):
            a, b = getattr(got, attr), getattr(exp, attr)
            assert (a is None) == (b is None) and (a is None or bool(a) == bool(b))
    if cell.api.semantics == "keras":  # at N(0, 3²) over 1000 classes Keras's clip matters
        assert "keras.clip_epsilon" in ref.known


@pytest.mark.parametrize("cell", _small_cells(), ids=lambda c: c.id)
def test_chunked_reference_passes_the_unchunked_run_cell_path(
    cell: scale.ScaleCell, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fed to ``forward.run_cell`` as the framework's output, the chunked reference is its reference."""
    t, s = scale.logits(cell.case, cell.dtype)
    monkeypatch.setattr(Case, "logits", lambda self, shift=0: (widen(t), widen(s)))
    monkeypatch.setattr(exact, "_KEPT", exact._Kept(0))  # nothing kept from the real logits of this case
    ref = _chunked(cell)

    def call(*_: Any) -> dict[str, Output]:
        return {red: Output(np.asarray(e.value), e.dtype) for red, e in ref.expected.items()}

    case = Case("gauss", SMALL.shape, SMALL.temperature, SMALL.scale)
    assert case.id == SMALL.id
    results = forward.run_cell(REGISTRY[cell.framework], forward.Cell(cell.framework, cell.api, case, cell.dtype,
                                                                     "cpu", "contiguous"), call=call)  # fmt: skip
    assert results and all(r.ok for r in results), [r.problems for r in results]
    for r in results:
        assert r.max_rel <= REL
        assert r.tolerance == pytest.approx(float(ref.expected[r.reduction].tolerance), rel=REL)


def test_one_sweep_serves_every_api_of_a_case_and_dtype() -> None:
    pytest.importorskip("torch")
    group = [c for c in _small_cells() if c.framework == "torch" and c.dtype == "bfloat16"]
    assert len(group) == 2
    specs = {scale.specs_for(c, group) for c in group}
    assert len(specs) == 1  # the same cache key whichever cell comes first
    first, second = (scale.run_cell(c, 7, group=group, rows=ROWS, workers=1) for c in group)
    assert first.oracle_peak_bytes is not None and second.oracle_peak_bytes is None
    assert all(r.ok for r in first.results + second.results)


@pytest.fixture
def torch_small() -> scale.ScaleCell:
    pytest.importorskip("torch")
    return next(c for c in _small_cells() if c.framework == "torch" and c.dtype == "float32")


@pytest.mark.parametrize("cell", _small_cells(), ids=lambda c: c.id)
def test_small_cells_pass_with_the_real_frameworks(cell: scale.ScaleCell) -> None:
    """The scale runners (zero-copy torch tensors, bfloat16 through int16; Keras) on a small case: a control."""
    if not REGISTRY[cell.framework].available():
        pytest.skip(REGISTRY[cell.framework].missing_reason())
    run = scale.run_cell(cell, rows=ROWS, workers=1)
    assert [r.reduction for r in run.results] == list(cell.api.reductions)
    assert all(r.ok for r in run.results), scale.failure_message(cell, 0, run.results)
    assert all(0 < r.tightness < 1 and r.api.endswith(scale.TAG) for r in run.results)
    assert run.input_bytes == 2 * cell.case.size * (4 if cell.dtype == "float32" else 2)


def test_torch_drift_of_1e4_relative_fails(torch_small: scale.ScaleCell, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    original = torch.nn.functional.kl_div

    def drift(*a: Any, **k: Any) -> Any:
        return original(*a, **k) * (1 + 1e-4)

    monkeypatch.setattr(torch.nn.functional, "kl_div", drift)
    run = scale.run_cell(torch_small, 5, rows=ROWS, workers=1)
    assert [r.ok for r in run.results] == [False, False]
    message = scale.failure_message(torch_small, 5, run.results)
    assert "exceeds tolerance" in message
    for part in (torch_small.case.id, f"seed {SMALL.seed(5)}", "float32", "max rel 0.0001",
                 "error model:",
                 f"repro: python -m klparity.engine.scale --cell '{torch_small.id}' --seed 5"):  # fmt: skip
        assert part in message


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_memory_estimate_skips_when_memory_is_short(framework: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not REGISTRY[framework].available():
        pytest.skip(REGISTRY[framework].missing_reason())
    cell = scale.cells(grid.Selection(frameworks=(framework,)))[0]
    need = scale.estimate_bytes(cell)
    assert 2 * cell.case.size * 4 < need < 16 * scale.GIB  # the float32 inputs alone are 2 GiB
    monkeypatch.setattr(scale, "_POOLED", {})
    monkeypatch.setattr(scale, "mem_available", lambda: scale.GIB)
    reason = scale.skip_reason(cell)
    assert reason is not None
    assert re.search(rf"needs ~{need / scale.GIB:.1f} GiB, 1\.0 GiB available", reason), reason
    monkeypatch.setattr(scale, "mem_available", lambda: need)
    assert scale.skip_reason(cell) is None
    # what TensorFlow's allocator kept from an earlier scale call counts as available to it
    monkeypatch.setattr(scale, "mem_available", lambda: need - scale.GIB)
    assert scale.skip_reason(cell) is not None
    monkeypatch.setattr(scale, "_POOLED", {framework: scale.GIB})
    assert scale.skip_reason(cell) is None


def test_mem_available_reads_proc_meminfo() -> None:
    avail = scale.mem_available()
    if not os.path.exists("/proc/meminfo"):
        assert avail is None
    else:
        assert avail is not None and 0 < avail < 2**50


def test_tier_skips_without_the_option_and_names_it() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/equivalence/test_scale.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert re.search(r"SKIPPED \[10\] .*run with --klparity-scale", out.stdout), out.stdout
    assert "10 skipped" in out.stdout


def test_scale_cells_are_small_in_number_and_large_in_size() -> None:
    every = scale.cells(grid.Selection())
    assert len(every) == 10 and len({c.id for c in every}) == 10
    assert {c.case.classes for c in every} == {128256, 256000}
    assert all(c.case.size <= 2**28 and len(c.case.shape) == 3 for c in every)
    assert [c.framework for c in every] == sorted((c.framework for c in every), key=["torch", "tensorflow"].index)
    assert scale.cells(grid.Selection(dtypes=("float16",))) == []
