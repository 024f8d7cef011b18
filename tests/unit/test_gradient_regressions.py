"""The gradient checks must fail on plausible backward-pass regressions, injected by patching frameworks.

Each test runs the quick-tier gradient cells of one framework and dtype (CPU, contiguous) with a
patched loss whose forward value is untouched and whose backward is off, and asserts that checks
fail with a message naming the symptom. A control runs the same cells unpatched: all pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from klparity.engine import grid
from klparity.engine.gradients import grad_cells, run_grad_cell
from klparity.frameworks import REGISTRY
from klparity.model import CheckResult

#: The size of the injected drift: 1 % on every gradient component.
FACTOR = 1.01


def _run(framework: str, dtype: str) -> list[CheckResult]:
    sel = grid.Selection(frameworks=(framework,), dtypes=(dtype,), devices=("cpu",))
    out: list[CheckResult] = []
    for cell in grad_cells(sel):
        if cell.layout == "contiguous" and grid.skip_reason(cell, 0) is None:
            out += run_grad_cell(REGISTRY[framework], cell)
    return out


def _problems(results: list[CheckResult]) -> str:
    return "\n".join(p for r in results if not r.ok for p in r.problems)


def _need(framework: str) -> None:
    if not REGISTRY[framework].available():
        pytest.skip(REGISTRY[framework].missing_reason())


@pytest.mark.parametrize(
    "framework,dtype",
    [("torch", "float32"), ("torch", "float64"), ("tensorflow", "float32"), ("tensorflow", "float64")],
)
def test_control_unpatched_gradient_cells_pass(framework: str, dtype: str) -> None:
    _need(framework)
    results = _run(framework, dtype)
    assert results and all(r.ok for r in results), _problems(results)
    assert {r.api.split(" ")[0] for r in results} == {"d/dstudent", "d/dteacher"}


@pytest.fixture
def torch_scaled(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[bool, bool], None]]:
    """Patch ``F.kl_div`` so that its backward to the input and/or the target is scaled by FACTOR."""
    torch = pytest.importorskip("torch")
    original = torch.nn.functional.kl_div

    class ScaleBackward(torch.autograd.Function):  # type: ignore[misc]
        """Identity forward; backward times FACTOR."""

        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            return x.clone()

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            return grad * FACTOR

    def install(scale_input: bool, scale_target: bool) -> None:
        def patched(inp: Any, tgt: Any, *a: Any, **k: Any) -> Any:
            inp = ScaleBackward.apply(inp) if scale_input else inp
            tgt = ScaleBackward.apply(tgt) if scale_target else tgt
            return original(inp, tgt, *a, **k)

        # nn.KLDivLoss.forward calls torch.nn.functional.kl_div through the module attribute
        monkeypatch.setattr(torch.nn.functional, "kl_div", patched)

    yield install


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_backward_scaled_by_1_01_fails(torch_scaled: Callable[[bool, bool], None], dtype: str) -> None:
    torch_scaled(True, True)
    results = _run("torch", dtype)
    failed = [r for r in results if not r.ok]
    assert failed, "a 1 % error in torch's kl_div backward went unnoticed"
    assert {r.api.split(" ")[0] for r in failed} == {"d/dstudent", "d/dteacher"}
    assert {r.reduction for r in failed} == {"none", "sum", "mean", "batchmean", "default"}
    assert "exceeds tolerance" in _problems(results)


def test_torch_target_backward_alone_scaled_fails_only_teacher_checks(
    torch_scaled: Callable[[bool, bool], None],
) -> None:
    torch_scaled(False, True)
    results = _run("torch", "float32")
    failed = [r for r in results if not r.ok]
    # kl_div's target is the teacher, except in TRL's beta 1 (reverse KL: kl_div(teacher log p, student log q))
    reverse = "beta=1.0"
    assert failed and {r.api.split(" ")[0] for r in failed if reverse not in r.api} == {"d/dteacher"}
    assert {r.api.split(" ")[0] for r in failed if reverse in r.api} <= {"d/dstudent"}
    assert "exceeds tolerance" in _problems(results)


def test_keras_backward_scaled_by_1_01_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrap Keras's kl_divergence (which KLDivergence also calls) in a tf.custom_gradient."""
    _need("tensorflow")
    import keras
    import keras.src.losses.losses as keras_losses
    import tensorflow as tf

    original = keras_losses.kl_divergence

    def patched(y_true: Any, y_pred: Any) -> Any:
        @tf.custom_gradient  # type: ignore[misc]
        def scaled(t: Any, p: Any) -> Any:
            with tf.GradientTape() as tape:
                tape.watch([t, p])
                value = original(t, p)

            def grad(upstream: Any) -> Any:
                g_t, g_p = tape.gradient(value, [t, p], output_gradients=upstream)
                return g_t * FACTOR, g_p * FACTOR

            return value, grad

        return scaled(tf.convert_to_tensor(y_true), tf.convert_to_tensor(y_pred))

    monkeypatch.setattr(keras_losses, "kl_divergence", patched)  # KLDivergence looks it up here
    monkeypatch.setattr(keras.losses, "kl_divergence", patched)
    results = _run("tensorflow", "float32")
    failed = [r for r in results if not r.ok]
    assert failed, "a 1 % error in Keras's kl_divergence backward went unnoticed"
    assert {r.api for r in failed} >= {
        "d/dstudent keras.losses.KLDivergence()",
        "d/dstudent keras.losses.kl_divergence()",
    }
    assert "exceeds tolerance" in _problems(results)


def test_keras_clip_passing_gradient_through_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A straight-through clip (gradient 1 below epsilon) would silently 'fix' the clipped gradient."""
    _need("tensorflow")
    import keras.src.losses.losses as keras_losses
    import tensorflow as tf

    def straight_through(x: Any, lo: Any, hi: Any) -> Any:
        x = tf.convert_to_tensor(x)
        return x + tf.stop_gradient(tf.clip_by_value(x, lo, hi) - x)

    monkeypatch.setattr(keras_losses.ops, "clip", straight_through)
    results = _run("tensorflow", "float32")
    failed = [r for r in results if not r.ok]
    assert failed and {r.case for r in failed} >= {"gauss3_8x1000_T0.5", "onehot_8x1000_T1"}
    assert "exceeds tolerance" in _problems(results)
