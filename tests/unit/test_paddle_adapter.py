"""The Paddle adapter and spec: the kernel formula and the (log_)softmax model on special values, the
adapter's outputs, its call-time lookup of kl_div, its silent import, and one injected regression.

The equivalence suite judges the adapter on every case; these tests pin what the spec's model relies on:
``paddle_pointwise`` is Paddle's ``kldiv_loss`` on every special value, and ``paddle_log_softmax`` /
``paddle_softmax`` reproduce the clip at -64 and the float32 AVX kernel's NaN handling.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pytest

from klparity.apis import SPECS
from klparity.apis.paddle_kl_div import CLIP, paddle_log_softmax, paddle_pointwise, paddle_softmax
from klparity.engine import grid, mutants
from klparity.engine.forward import Cell, run_cell
from klparity.frameworks import REGISTRY
from klparity.frameworks.paddle_adapter import ENTRY, PaddleAdapter
from klparity.numerics.cases import Case
from klparity.numerics.exact import case_exact

with warnings.catch_warnings():  # `import paddle` warns "No ccache found" (the adapter records it)
    warnings.simplefilter("ignore", UserWarning)
    paddle = pytest.importorskip("paddle")

ADAPTER = REGISTRY["paddle"]
NINF, NAN = -math.inf, math.nan


def _tensor(x: Any, dtype: str = "float64") -> Any:
    return paddle.to_tensor(np.asarray(x, dtype), place=paddle.CPUPlace())


def _same_special(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> None:
    """NaN, +inf, -inf and exact zeros in the same places (finite values are the suite's business)."""
    for name, pred in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf), ("0", lambda a: a == 0)):
        np.testing.assert_array_equal(pred(got), pred(want), err_msg=f"{name} pattern differs")


def test_pointwise_is_paddles_kernel_on_special_values() -> None:
    """target <= 0 gives 0 whatever the input (NaN, -inf included); log_target is torch's formula."""
    targets = (0.0, -0.25, 1e-300, 0.25, 1.0, NAN)
    inputs = (NINF, -700.0, -1.0, 0.0, NAN)
    t = np.array([[a] for a in targets for _ in inputs])
    x = np.array([[b] for _ in targets for b in inputs])
    got = np.asarray(paddle.nn.functional.kl_div(_tensor(x), _tensor(t), reduction="none").numpy())
    want = paddle_pointwise(x, t)
    _same_special(got, want)
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-13, atol=0)
    lt = np.array([[a] for a in (NINF, -700.0, -1.0, 0.0, NAN) for _ in inputs])
    got_lt = np.asarray(paddle.nn.functional.kl_div(_tensor(x[: lt.size]), _tensor(lt), reduction="none",
                                                    log_target=True).numpy())  # fmt: skip
    _same_special(got_lt, paddle_pointwise(x[: lt.size], lt, log_target=True))


ROWS = [[0.0, NINF, -63.9, -64.1, 3.0], [0.0, -100.0, -1000.0, NINF, 1.0], [NINF, NINF, 0.0, 1.0, 2.0]]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_log_softmax_and_softmax_clip_at_minus_64(dtype: str) -> None:
    x = np.array(ROWS, dtype)
    fn = paddle.nn.functional
    got_l = np.asarray(fn.log_softmax(_tensor(x, dtype), axis=-1).numpy(), np.float64)
    got_p = np.asarray(fn.softmax(_tensor(x, dtype), axis=-1).numpy(), np.float64)
    want_l = paddle_log_softmax(x.astype(np.float64), 1.0)
    want_p, _, swallowed = paddle_softmax(x.astype(np.float64), 1.0, dtype)
    assert np.all(np.isfinite(got_l)) and not swallowed.any()
    rtol = 1e-6 if dtype == "float32" else 1e-14
    np.testing.assert_allclose(got_l, want_l, rtol=rtol, atol=0)
    np.testing.assert_allclose(got_p, want_p, rtol=rtol, atol=0)
    # the masked class of row 1: z - max z = -inf, clipped to -64, so log q = -64 - log S (and q > 0)
    log_s = math.log(float(np.sum(np.exp(np.maximum(x[1].astype(np.float64) - 1.0, CLIP)))))
    assert got_p[1, 3] > 0 and math.isclose(got_l[1, 3], CLIP - log_s, rel_tol=rtol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [4, 8, 10, 16])
def test_softmax_nan_model_matches_paddle(dtype: str, n: int) -> None:
    """A NaN at every position of rows of n classes: NaN rows and values as ``paddle_softmax`` says."""
    x = np.tile(np.linspace(-1.0, 1.0, n), (n, 1))
    x[np.arange(n), np.arange(n)] = NAN
    got = np.asarray(paddle.nn.functional.softmax(_tensor(x, dtype), axis=-1).numpy(), np.float64)
    want, _, swallowed = paddle_softmax(x, 1.0, dtype)
    _same_special(got, want)
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=1e-6 if dtype == "float32" else 1e-14, atol=0)
    assert swallowed.any() == (dtype == "float32" and n >= 8)
    lsm = np.asarray(paddle.nn.functional.log_softmax(_tensor(x, dtype), axis=-1).numpy())
    assert np.all(np.isnan(lsm)) and np.all(np.isnan(paddle_log_softmax(x, 1.0)))


def test_adapter_outputs() -> None:
    assert isinstance(ADAPTER, PaddleAdapter)
    assert ADAPTER.dtypes == ("float32", "float64") and "cpu" in ADAPTER.devices()
    apis = ADAPTER.apis("float32")
    assert [a.id for a in apis] == [f"{ENTRY}(log_target=False)", f"{ENTRY}(log_target=True)"]
    assert all(a.semantics in SPECS for a in apis)
    t, s = Case("gauss", (2, 3, 5), 2.0, 3.0).logits()
    for dtype in ADAPTER.dtypes:
        out = ADAPTER.run(apis[0], t.astype(dtype), s.astype(dtype), 2.0, "cpu", "contiguous")
        assert set(out) == set(apis[0].reductions)
        assert all(o.dtype == dtype and not o.warnings for o in out.values())
        assert out["none"].value.shape == (2, 3, 5) and out["sum"].value.shape == ()
        assert out["default"].value == out["mean"].value  # the default is 'mean'
        total = float(np.sum(out["none"].value))
        assert math.isclose(float(out["batchmean"].value), total / 2, rel_tol=1e-5)  # ÷ shape[0], not B*S
    with pytest.raises(ValueError, match="contiguous"):
        ADAPTER.run(apis[0], t, s, 2.0, "cpu", "strided")


def test_kl_div_is_looked_up_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    original = paddle.nn.functional.kl_div
    monkeypatch.setattr(paddle.nn.functional, "kl_div", lambda *a, **k: original(*a, **k) * 2.0)
    api = ADAPTER.apis("float64")[0]
    t, s = Case("gauss", (4, 10), 1.0, 3.0).logits()
    doubled = ADAPTER.run(api, t, s, 1.0, "cpu", "contiguous")["sum"].value
    monkeypatch.undo()
    plain = ADAPTER.run(api, t, s, 1.0, "cpu", "contiguous")["sum"].value
    assert float(doubled) == 2.0 * float(plain)


def test_import_through_the_adapter_raises_no_warning() -> None:
    """Under -W error (pytest's filterwarnings), importing Paddle through the adapter must not fail."""
    code = ("from klparity.frameworks import REGISTRY; a = REGISTRY['paddle']; a._paddle(); "
            "print(len(a.import_warnings))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_nan_case_differences_depend_on_dtype() -> None:
    """The float32 softmax swallows the nan case's teacher NaN (a documented difference); float64 does not."""
    case = Case("nan", (4, 10), 1.0)
    spec, api = SPECS["paddle_kl_div"], ADAPTER.apis("float32")[0]
    for dtype, swallowed in (("float32", True), ("float64", False)):
        found = spec.known_differences(api, case_exact(case, 0, dtype), dtype)
        assert ("paddle.float32_softmax_swallows_nan" in found) == swallowed


def test_batchmean_numel_mutant_is_caught() -> None:
    cell = next(c for c in grid.cells(grid.Selection(frameworks=("paddle",), dtypes=("float64",), devices=("cpu",)))
                if c.case.id == "gauss3_8x1000_T1")  # fmt: skip
    assert isinstance(cell, Cell) and all(r.ok for r in run_cell(ADAPTER, cell))
    mutants.install(mutants.get("paddle_batchmean_numel"))
    try:
        results = run_cell(ADAPTER, cell)
    finally:
        mutants.uninstall()
    bad = [r for r in results if not r.ok]
    assert bad and any("batchmean" in r.reduction for r in bad)
