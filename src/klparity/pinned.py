"""Pinned facts: framework behaviours a distillation user relies on, each re-measured on every run.

A ``Fact`` is a name, a framework, a one-line statement, the reason it matters, the value it was
pinned at, and a probe that measures the current behaviour (``Measured``: the comparable value and
the numbers behind it). ``check`` compares; when a release changes a fact the message names the fact,
the pinned and the new behaviour and the framework's version. Probes use deterministic data from
``Case.logits()`` only and reach frameworks through their adapters (so thread and GPU-memory settings
come first). ``python -m klparity.pinned [NAME...]`` prints the current measurements.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from klparity import oracle
from klparity.cases import Case
from klparity.checks import Exact
from klparity.dtypes import round_to, widen
from klparity.frameworks import REGISTRY
from klparity.frameworks.keras_adapter import KerasAdapter
from klparity.frameworks.torch_adapter import TorchAdapter
from klparity.tolerances import budget, same_sum

F64 = NDArray[np.float64]
#: A pinned value: plain data (str, bool, float, or a dict of them) that compares with ``==``.
Value = Any


@dataclass(frozen=True)
class Measured:
    """What a probe saw: ``value`` is compared with the pinned one; ``detail`` holds the numbers."""

    value: Value
    detail: str


@dataclass(frozen=True)
class Fact:
    """One pinned behaviour of one framework."""

    name: str
    framework: str  #: registry name
    statement: str
    reason: str
    pinned: Value
    probe: Callable[[], Measured]


FACTS: dict[str, Fact] = {}


Probe = Callable[[], Measured]


def fact(name: str, framework: str, statement: str, reason: str, pinned: Value) -> Callable[[Probe], Probe]:
    """Register the decorated probe as the fact ``name``."""

    def register(probe: Probe) -> Probe:
        if name in FACTS:
            raise ValueError(f"pinned fact {name!r} registered twice")
        FACTS[name] = Fact(name, framework, statement, reason, pinned, probe)
        return probe

    return register


def version(framework: str) -> str:
    """The framework's version as reported (with Keras's for TensorFlow)."""
    adapter = REGISTRY[framework]
    v = f"{framework} {adapter.version()}"
    if isinstance(adapter, KerasAdapter) and adapter.available():
        v += f" (Keras {adapter.keras_version()})"
    return v


def check(f: Fact) -> tuple[bool, Measured, str]:
    """Probe ``f``; return (still holds, measurement, standalone message)."""
    got = f.probe()
    ok = got.value == f.pinned
    verdict = "holds" if ok else "NO LONGER HOLDS"
    msg = (
        f"pinned fact {f.name!r} {verdict} on {version(f.framework)}: {f.statement}\n"
        f"  pinned: {f.pinned!r}\n"
        f"  now:    {got.value!r}\n"
        f"  measured: {got.detail}\n"
        f"  why it matters: {f.reason}\n"
        f"  repro: python -m klparity.pinned {f.name}"
    )
    return ok, got, msg


# ------------------------------------------------------------------------------------- helpers


def _torch() -> ModuleType:
    adapter = REGISTRY["torch"]
    assert isinstance(adapter, TorchAdapter)
    return adapter._torch()  # thread settings applied before first use


def _tf() -> tuple[ModuleType, ModuleType]:
    adapter = REGISTRY["tensorflow"]
    assert isinstance(adapter, KerasAdapter)
    tf = adapter._tf()  # memory growth and threads set before TensorFlow's runtime starts
    import keras

    return tf, keras


@contextmanager
def _tf_cpu() -> Iterator[tuple[ModuleType, ModuleType]]:
    tf, keras = _tf()
    with tf.device("/CPU:0"):
        yield tf, keras


def _logits(case: Case, dtype: str = "float64") -> tuple[F64, F64]:
    """The case's logits rounded to ``dtype`` (as float64 arrays holding those values)."""
    t, s = case.logits()
    return widen(round_to(t, dtype)), widen(round_to(s, dtype))


def _torch_inputs(case: Case, dtype: str = "float64") -> tuple[Any, Any, Any]:
    """(log q, p, log p) as torch tensors of ``dtype``, computed by torch from the case's logits / T."""
    torch = _torch()
    t, s = _logits(case, dtype)
    tt, ss = (torch.from_numpy(x).to(getattr(torch, dtype)) / case.temperature for x in (t, s))
    fn = torch.nn.functional
    return fn.log_softmax(ss, dim=-1), fn.softmax(tt, dim=-1), fn.log_softmax(tt, dim=-1)


def _keras_inputs(case: Case, dtype: str = "float64") -> tuple[Any, Any]:
    """(y_true, y_pred) = softmax(t / T), softmax(s / T) computed by TensorFlow in ``dtype``."""
    tf, _ = _tf()
    t, s = _logits(case, dtype)
    return (tf.nn.softmax(tf.cast(tf.constant(x), dtype) / case.temperature, axis=-1) for x in (t, s))  # type: ignore[return-value]


def _np(x: Any) -> F64:
    """A framework tensor as a float64 NumPy array."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double()
    return np.asarray(np.asarray(x).astype(np.float64), np.float64)


def _which(observed: float, candidates: dict[str, tuple[float, float]], terms_abs_sum: float, n: int) -> str:
    """The candidate (name -> (value, divisor)) equal to ``observed`` within the float64 rounding of
    the sum; 'none of ...' when none is, so that a new behaviour cannot pass as an old one."""
    hits = [name for name, (value, div) in candidates.items()
            if abs(observed - value) <= same_sum("float64", n, terms_abs_sum) / div]  # fmt: skip
    if len(hits) == 1:
        return hits[0]
    return f"none of {sorted(candidates)} (observed {observed:.17g})" if not hits else f"ambiguous {sorted(hits)}"


def _kind(x: float) -> str:
    return "nan" if math.isnan(x) else ("+inf" if x == math.inf else ("-inf" if x == -math.inf else "finite"))


@contextmanager
def _recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning raised inside (the probe reports them; none escapes to pytest)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


SMALL = Case("gauss", (4, 10), 1.0, 3.0)
ONE_D = Case("gauss", (10,), 1.0, 3.0)
THREE_D = Case("gauss", (2, 3, 10), 1.0, 3.0)
MASKED = Case("masked", (4, 10), 1.0, 0.25)
TEACHER_MASKED = Case("teacher_masked", (4, 10), 1.0, 0.25)
STUDENT_MASKED = Case("student_masked", (4, 10), 1.0)
IDENTICAL = Case("identical", (8, 1000), 1.0, 3.0)
HOT = Case("gauss", (8, 1000), 1000.0, 3.0)
NAN = Case("nan", (4, 10), 1.0)
WIDE = {t: Case("gauss", (8, 1000), t, 3.0) for t in (0.5, 1.0, 2.0, 5.0, 10.0)}

TORCH_MEAN_TEXT = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


# --------------------------------------------------------------------------------------- torch


@fact(
    "torch.default_reduction_mean", "torch",
    "F.kl_div and nn.KLDivLoss default to reduction='mean' = sum / numel (B*C), with a UserWarning",
    "the default is not the KL divergence: it is C times too small; 'batchmean' is the mathematical one",
    {"F.kl_div": "numel", "nn.KLDivLoss": "numel", "warning": f"UserWarning: {TORCH_MEAN_TEXT}"},
)  # fmt: skip
def _torch_default_mean() -> Measured:
    torch = _torch()
    x, p, _ = _torch_inputs(SMALL)
    pointwise = _np(torch.nn.functional.kl_div(x, p, reduction="none"))
    b, n = pointwise.shape[0], pointwise.size
    total, abs_sum = float(np.sum(pointwise)), float(np.sum(np.abs(pointwise)))
    c = pointwise.shape[-1]
    cands = {
        "numel": (total / n, float(n)),
        "B": (total / b, float(b)),
        "sum": (total, 1.0),
        "C": (total / c, float(c)),
    }
    out: dict[str, str] = {}
    texts, values = set(), []
    for name in ("F.kl_div", "nn.KLDivLoss"):
        with _recorded_warnings() as caught:
            res = torch.nn.functional.kl_div(x, p) if name == "F.kl_div" else torch.nn.KLDivLoss()(x, p)
            value = float(res)
        out[name] = _which(value, cands, abs_sum, n)
        values.append(f"{name} {value:.17g}")
        texts |= {f"{w.category.__name__}: {w.message}" for w in caught}
    out["warning"] = " | ".join(sorted(texts)) or "none"
    return Measured(
        out, f"sum {total:.17g} over {n} elements ({b} rows of {pointwise.shape[-1]}); " + ", ".join(values)
    )


@fact(
    "torch.batchmean_divisor", "torch",
    "reduction='batchmean' divides by input.size(0): C for 1-D input, B (not B*S) for (B, S, C)",
    "a 1-D distribution is not a batch of one; a sequence batch is not averaged over positions",
    {"1-D (C,)": "C", "2-D (B, C)": "B", "3-D (B, S, C)": "B"},
)  # fmt: skip
def _torch_batchmean() -> Measured:
    torch = _torch()
    out, details = {}, []
    for label, case in (("1-D (C,)", ONE_D), ("2-D (B, C)", SMALL), ("3-D (B, S, C)", THREE_D)):
        x, p, _ = _torch_inputs(case)
        pointwise = _np(torch.nn.functional.kl_div(x, p, reduction="none"))
        total, shape = float(np.sum(pointwise)), case.shape
        divs = {"1-D (C,)": {"C": shape[0], "1": 1},
                "2-D (B, C)": {"B": shape[0], "C": shape[-1], "numel": math.prod(shape), "1": 1},
                "3-D (B, S, C)": {"B": shape[0], "B*S": math.prod(shape[:-1]), "numel": math.prod(shape),
                                  "1": 1}}[label]  # fmt: skip
        cands = {k: (total / d, float(d)) for k, d in divs.items()}
        value = float(torch.nn.functional.kl_div(x, p, reduction="batchmean"))
        out[label] = _which(value, cands, float(np.sum(np.abs(pointwise))), pointwise.size)
        details.append(f"{label} shape {shape}: batchmean {value:.6g}, sum {total:.6g}")
    return Measured(out, "; ".join(details))


@fact(
    "torch.mixed_dtypes_promote", "torch",
    "kl_div(float32 input, float64 target) (and the reverse) returns float64, without a warning",
    "a float64 teacher silently upgrades the loss (and its cost); no error flags the mismatch",
    {"float32 input, float64 target": "float64", "float64 input, float32 target": "float64", "warnings": "none"},
)  # fmt: skip
def _torch_mixed() -> Measured:
    torch = _torch()
    x, p, _ = _torch_inputs(SMALL)
    with _recorded_warnings() as caught:
        a = torch.nn.functional.kl_div(x.float(), p, reduction="sum")
        b = torch.nn.functional.kl_div(x, p.float(), reduction="sum")
    value = {"float32 input, float64 target": str(a.dtype).removeprefix("torch."),
             "float64 input, float32 target": str(b.dtype).removeprefix("torch."),
             "warnings": "; ".join(str(w.message) for w in caught) or "none"}  # fmt: skip
    return Measured(value, f"values {float(a):.9g}, {float(b):.9g}")


@fact(
    "torch.log_target_neg_inf_nan", "torch",
    "log_target=True with a -inf log-target gives NaN at that class (exp(-inf) * (-inf - x) = 0 * -inf), "
    "so every reduction is NaN",
    "a one-hot or masked teacher passed in log space poisons the loss; the exact term is 0",
    {"pointwise at the -inf class": "nan", "other classes": "finite", "sum": "nan"},
)  # fmt: skip
def _torch_log_target_nan() -> Measured:
    torch = _torch()
    x, _, lp = _torch_inputs(TEACHER_MASKED)
    pw = _np(torch.nn.functional.kl_div(x, lp, reduction="none", log_target=True))
    masked = _np(lp) == -np.inf
    total = float(torch.nn.functional.kl_div(x, lp, reduction="sum", log_target=True))
    value = {"pointwise at the -inf class": "nan" if np.all(np.isnan(pw[masked])) else "not all nan",
             "other classes": "finite" if np.all(np.isfinite(pw[~masked])) else "not all finite",
             "sum": _kind(total)}  # fmt: skip
    exact = float(np.sum(oracle.kl_from_logits(*_logits(TEACHER_MASKED))))
    return Measured(
        value,
        f"{int(masked.sum())} -inf log-targets of {masked.size}; exact KL {exact:.6g}",
    )


@fact(
    "torch.log_probs_as_target_silent_nan", "torch",
    "passing log-probabilities as target without log_target=True gives NaN (xlogy of negative targets), silently",
    "the commonest argument mistake raises nothing and warns nothing: training sees NaN",
    {"sum": "nan", "warnings": "none", "raised": "nothing"},
)  # fmt: skip
def _torch_log_probs_as_target() -> Measured:
    torch = _torch()
    x, _, lp = _torch_inputs(SMALL)
    raised = "nothing"
    total = math.nan
    with _recorded_warnings() as caught:
        try:
            total = float(torch.nn.functional.kl_div(x, lp, reduction="sum"))
        except Exception as e:  # a future release may refuse: that is the change this fact watches
            raised = type(e).__name__
    value = {"sum": _kind(total), "warnings": "; ".join(str(w.message) for w in caught) or "none", "raised": raised}
    return Measured(value, f"sum {total!r}")


@fact(
    "torch.masked_class_nan", "torch",
    "a class masked with -inf in both teacher and student gives 0 * (-inf) = NaN, so the loss is NaN",
    "masked vocabularies (padding, constrained decoding) make torch's loss NaN; the exact KL is finite",
    {"sum": "nan", "exact": "finite"},
)  # fmt: skip
def _torch_masked() -> Measured:
    torch = _torch()
    x, p, _ = _torch_inputs(MASKED)
    total = float(torch.nn.functional.kl_div(x, p, reduction="sum"))
    exact = float(np.sum(oracle.kl_from_logits(*_logits(MASKED))))
    return Measured({"sum": _kind(total), "exact": _kind(exact)}, f"torch {total!r}, exact {exact:.17g}")


@fact(
    "torch.student_neg_inf_is_inf", "torch",
    "a student -inf where the teacher has mass gives +inf (the exact KL)",
    "correct, and unlike Keras, which clips the student and reports a finite value",
    {"sum": "+inf", "exact": "+inf"},
)  # fmt: skip
def _torch_student_inf() -> Measured:
    torch = _torch()
    x, p, _ = _torch_inputs(STUDENT_MASKED)
    total = float(torch.nn.functional.kl_div(x, p, reduction="sum"))
    exact = float(np.sum(oracle.kl_from_logits(*_logits(STUDENT_MASKED))))
    return Measured({"sum": _kind(total), "exact": _kind(exact)}, f"torch {total!r}")


@fact(
    "torch.identical_float32_rounding_noise", "torch",
    "identical float32 teacher and student: the probability-target rows are rounding noise (xlogy(p, p) and "
    "p * log_softmax round differently), within the suite's forward float32 tolerance and not all exactly 0; "
    "with log_target=True exactly 0 (exp(t) * (t - t) = 0)",
    "a test asserting KL(p, p) == 0 fails in float32 with probabilities; a (tiny) negative loss is possible",
    {"rows": "not all exactly 0", "within the forward float32 tolerance": True, "log_target=True sum": "exactly 0"},
)  # fmt: skip
def _torch_identical() -> Measured:
    # Which rows are 0 and their signs are rounding patterns (they differ between CPU kernels, e.g.
    # ATEN_CPU_CAPABILITY=default vs avx2): pinned are the bound and "not all exactly 0" only.
    torch = _torch()
    x, p, lp = _torch_inputs(IDENTICAL, "float32")
    pw = _np(torch.nn.functional.kl_div(x, p, reduction="none"))
    rows = np.sum(pw, axis=-1)  # float64 sum of torch's float32 terms
    torch_rows = _np(torch.nn.functional.kl_div(x, p, reduction="none").sum(dim=-1))
    kind = "all exactly 0" if np.all(torch_rows == 0) and np.all(pw == 0) else "not all exactly 0"
    ex = Exact.of(*_logits(IDENTICAL, "float32"), IDENTICAL.temperature)
    bound = budget(framework="torch", input_dtype="float32", compute_dtype="float32", p=ex.p, q=ex.q, zt=ex.zt,
                   zs=ex.zs, student_is_probability=False, log_p=ex.lp, log_q=ex.lq).rows()  # fmt: skip
    lt = float(torch.nn.functional.kl_div(x, lp, reduction="sum", log_target=True))
    value = {"rows": kind, "within the forward float32 tolerance": bool(np.all(np.abs(torch_rows) <= bound)),
             "log_target=True sum": "exactly 0" if lt == 0.0 else f"{lt!r}"}  # fmt: skip
    sums = ", ".join(f"{v:.3g}" for v in torch_rows)
    terms = ", ".join(f"{v:.3g}" for v in rows)
    return Measured(
        value,
        f"row sums {sums} (float64 sums of the terms: {terms}); {int(np.sum(pw != 0))} of {pw.size} terms nonzero; "
        f"tolerance up to {np.max(bound):.3g}",
    )


@fact(
    "torch.float16_T1000_error_exceeds_kl", "torch",
    "at T = 1000 in float16 (8x1000, N(0, 3^2) logits) |batchmean - exact| is larger than the exact KL (~9e-6): "
    "the result's sign means nothing",
    "half-precision rounding of log-probabilities (~7e-3 each) swamps a tiny KL; the value can be negative",
    {"|batchmean - exact| > exact": True, "exact": "positive"},
)  # fmt: skip
def _torch_float16_hot() -> Measured:
    torch = _torch()
    x, p, _ = _torch_inputs(HOT, "float16")
    value = float(torch.nn.functional.kl_div(x, p, reduction="batchmean"))
    exact = float(np.mean(oracle.kl_from_logits(*_logits(HOT, "float16"), HOT.temperature)))
    return Measured({"|batchmean - exact| > exact": bool(abs(value - exact) > abs(exact)),
                     "exact": "positive" if exact > 0 else "not positive"},
                    f"torch float16 batchmean {value:.4g}, exact {exact:.4g}, "
                    f"error / exact {abs(value - exact) / exact:.3g}")  # fmt: skip


@fact(
    "torch.nan_propagates", "torch",
    "a NaN logit makes that row NaN (reduction='none' summed per row) and every reduction NaN; other rows stay finite",
    "NaN must not be hidden by a reduction",
    {"NaN row": "nan", "other rows": "finite", "sum": "nan", "batchmean": "nan", "mean": "nan"},
)  # fmt: skip
def _torch_nan() -> Measured:
    torch = _torch()
    x, p, _ = _torch_inputs(NAN)
    rows = np.sum(_np(torch.nn.functional.kl_div(x, p, reduction="none")), axis=-1)
    value: dict[str, str] = {"NaN row": _kind(float(rows[0])),
                             "other rows": "finite" if np.all(np.isfinite(rows[1:])) else "not all finite"}  # fmt: skip
    with _recorded_warnings():  # 'mean' warns (pinned by torch.default_reduction_mean)
        for red in ("sum", "batchmean", "mean"):
            value[red] = _kind(float(torch.nn.functional.kl_div(x, p, reduction=red)))
    return Measured(value, f"rows {rows}")


@fact(
    "torch.target_grad_nan_at_zero_target", "torch",
    "the gradient w.r.t. a target that is exactly 0 is NaN (xlogy backward 0/0; log_target: 0 * -inf) and the "
    "softmax backward spreads it over the row; the input gradient stays finite and exact",
    "a trainable (or un-detached) teacher with a masked class gets NaN gradients",
    {"log_target=False teacher grad": "row nan", "log_target=True teacher grad": "row nan", "student grad": "finite"},
)  # fmt: skip
def _torch_target_grad() -> Measured:
    torch = _torch()
    fn = torch.nn.functional
    t, s = _logits(TEACHER_MASKED)
    out, detail = {}, []
    for log_target in (False, True):
        tt = torch.from_numpy(t).requires_grad_(True)
        ss = torch.from_numpy(s).requires_grad_(True)
        tgt = fn.log_softmax(tt, dim=-1) if log_target else fn.softmax(tt, dim=-1)
        loss = fn.kl_div(fn.log_softmax(ss, dim=-1), tgt, reduction="sum", log_target=log_target)
        g_t, g_s = (_np(g) for g in torch.autograd.grad(loss, (tt, ss)))
        rows_nan = np.all(np.isnan(g_t), axis=-1)
        out[f"log_target={log_target} teacher grad"] = (
            "row nan" if rows_nan.all() else f"{int(rows_nan.sum())} of {rows_nan.size} rows nan"
        )
        out["student grad"] = "finite" if np.all(np.isfinite(g_s)) else "not finite"
        detail.append(f"log_target={log_target}: {int(rows_nan.sum())} NaN teacher-gradient rows")
    return Measured(out, "; ".join(detail) + f" (every row of {TEACHER_MASKED.id} has a -inf teacher logit)")


# --------------------------------------------------------------------------------------- keras


@fact(
    "keras.default_reduction", "tensorflow",
    "KLDivergence() defaults to reduction='sum_over_batch_size' = sum of rows / number of rows",
    "unlike torch's default, this is the batch-mean KL",
    {"reduction": "sum_over_batch_size", "value": "rows"},
)  # fmt: skip
def _keras_default() -> Measured:
    with _tf_cpu() as (_, keras):
        yt, yp = _keras_inputs(SMALL)
        loss = keras.losses.KLDivergence(dtype="float64")
        rows = _np(keras.losses.kl_divergence(yt, yp))
        total = float(np.sum(rows))
        value = float(loss(yt, yp))
    cands = {"rows": (total / rows.size, float(rows.size)), "sum": (total, 1.0), "numel": (total / 40, 40.0)}
    return Measured({"reduction": str(loss.reduction), "value": _which(value, cands, total, rows.size)},
                    f"{value:.17g} vs sum of rows {total:.17g}")  # fmt: skip


@fact(
    "keras.one_d_unreduced", "tensorflow",
    "a 1-D input gives a scalar, the row's KL, under every reduction (nothing to average over)",
    "torch's batchmean divides the same input by C",
    {r: "the row" for r in ("none", "sum", "sum_over_batch_size", "mean", "mean_with_sample_weight")},
)  # fmt: skip
def _keras_one_d() -> Measured:
    with _tf_cpu() as (_, keras):
        yt, yp = _keras_inputs(ONE_D)
        row = float(keras.losses.kl_divergence(yt, yp))
        out = {}
        for red in ("none", "sum", "sum_over_batch_size", "mean", "mean_with_sample_weight"):
            v = keras.losses.KLDivergence(reduction=red, dtype="float64")(yt, yp)
            c = ONE_D.shape[-1]
            label = _which(float(v), {"the row": (row, 1.0), "row / C": (row / c, float(c))}, row, c)
            out[red] = label if tuple(v.shape) == () else f"{label}, shape {tuple(v.shape)}"
    return Measured(out, f"row KL {row:.17g}")


@fact(
    "keras.three_d_divides_by_rows", "tensorflow",
    "a (B, S, C) input: sum_over_batch_size divides by B*S (every row), not by B",
    "torch's batchmean divides the same input by B: the two differ by a factor S",
    "B*S",
)  # fmt: skip
def _keras_three_d() -> Measured:
    with _tf_cpu() as (_, keras):
        yt, yp = _keras_inputs(THREE_D)
        rows = _np(keras.losses.kl_divergence(yt, yp))
        value = float(keras.losses.KLDivergence(dtype="float64")(yt, yp))
    total, (b, s, _) = float(np.sum(rows)), THREE_D.shape
    cands = {"B*S": (total / (b * s), float(b * s)), "B": (total / b, float(b)), "1": (total, 1.0)}
    return Measured(_which(value, cands, total, rows.size), f"{value:.17g}, rows sum {total:.17g}, B={b}, S={s}")


@fact(
    "keras.float64_computed_in_float32", "tensorflow",
    "KLDivergence() on float64 inputs computes in floatx() = float32 and returns float32 (bit-identical to "
    "casting the inputs first) unless dtype='float64' is given",
    "float64 users get float32 accuracy silently",
    {"result dtype": "float32", "equals float32 inputs": True, "with dtype='float64'": "float64", "floatx": "float32"},
)  # fmt: skip
def _keras_f64() -> Measured:
    with _tf_cpu() as (tf, keras):
        yt, yp = _keras_inputs(SMALL)
        a = keras.losses.KLDivergence()(yt, yp)
        b = keras.losses.KLDivergence()(tf.cast(yt, "float32"), tf.cast(yp, "float32"))
        c = keras.losses.KLDivergence(dtype="float64")(yt, yp)
        value = {"result dtype": a.dtype.name, "equals float32 inputs": bool(float(a) == float(b)),
                 "with dtype='float64'": c.dtype.name, "floatx": keras.config.floatx()}  # fmt: skip
    return Measured(value, f"default {float(a):.17g}, dtype='float64' {float(c):.17g}")


@fact(
    "keras.epsilon", "tensorflow",
    "keras.config.epsilon() is 1e-7: both distributions are clipped to [1e-7, 1]",
    "the clip changes KL and its gradient wherever a probability falls below it",
    1e-7,
)  # fmt: skip
def _keras_epsilon() -> Measured:
    _, keras = _tf()
    eps = float(keras.config.epsilon())
    return Measured(eps, f"epsilon() = {eps!r}, oracle.KERAS_EPSILON = {oracle.KERAS_EPSILON!r}")


@fact(
    "keras.masked_class_finite", "tensorflow",
    "a class masked with -inf in both teacher and student gives a finite loss (both clipped to 1e-7)",
    "unlike torch (NaN); the masked class adds 1e-7 * log(1) = 0, the other clipped classes shift it",
    "finite",
)  # fmt: skip
def _keras_masked() -> Measured:
    with _tf_cpu() as (_, keras):
        yt, yp = _keras_inputs(MASKED)
        v = float(keras.losses.KLDivergence(reduction="sum", dtype="float64")(yt, yp))
    exact = float(np.sum(oracle.kl_from_logits(*_logits(MASKED))))
    return Measured(_kind(v), f"Keras {v:.17g}, exact {exact:.17g}")


@fact(
    "keras.student_neg_inf_finite", "tensorflow",
    "a student -inf where the teacher has mass gives a finite loss (y_pred clipped to 1e-7); exact is +inf",
    "a student that rules out a teacher class is penalised by at most p log(p / 1e-7)",
    {"sum": "finite", "exact": "+inf"},
)  # fmt: skip
def _keras_student_inf() -> Measured:
    with _tf_cpu() as (_, keras):
        yt, yp = _keras_inputs(STUDENT_MASKED)
        v = float(keras.losses.KLDivergence(reduction="sum", dtype="float64")(yt, yp))
    exact = float(np.sum(oracle.kl_from_logits(*_logits(STUDENT_MASKED))))
    return Measured({"sum": _kind(v), "exact": _kind(exact)}, f"Keras sum {v:.6g}")


@fact(
    "keras.identical_exactly_zero", "tensorflow",
    "identical float32 y_true and y_pred give exactly 0 per row (log(t / t) = log 1 = 0)",
    "unlike torch's probability-target path, which leaves rounding noise of both signs",
    "exactly 0",
)  # fmt: skip
def _keras_identical() -> Measured:
    with _tf_cpu() as (_, keras):
        yt, _ = _keras_inputs(IDENTICAL, "float32")
        rows = _np(keras.losses.kl_divergence(yt, yt))
    return Measured("exactly 0" if np.all(rows == 0) else "nonzero", f"max |row| {float(np.max(np.abs(rows))):.3g}")


@fact(
    "keras.float16_T1000_error_exceeds_kl", "tensorflow",
    "at T = 1000 keras.losses.kl_divergence on float16 probabilities (float16 compute): on some rows the error "
    "is larger than the exact row KL",
    "as torch: half-precision rounding swamps a tiny KL; rows can be negative",
    "on some rows",
)  # fmt: skip
def _keras_float16_hot() -> Measured:
    with _tf_cpu() as (_, keras):
        yt, yp = _keras_inputs(HOT, "float16")
        rows = _np(keras.losses.kl_divergence(yt, yp))
    exact = oracle.kl_from_logits(*_logits(HOT, "float16"), HOT.temperature)
    swamped = np.abs(rows - exact) > np.abs(exact)
    return Measured("on some rows" if np.any(swamped) else "on no row",
                    f"rows {', '.join(f'{v:.2g}' for v in rows)}; exact ~{float(np.mean(exact)):.2g}; "
                    f"error > exact on {int(swamped.sum())} of {swamped.size} rows")  # fmt: skip


@fact(
    "keras.nan_propagates", "tensorflow",
    "a NaN logit makes that row NaN and every reduction NaN; other rows stay finite",
    "NaN must not be hidden by clipping or a reduction",
    {"NaN row": "nan", "other rows": "finite", "sum": "nan", "sum_over_batch_size": "nan"},
)  # fmt: skip
def _keras_nan() -> Measured:
    with _tf_cpu() as (_, keras):
        yt, yp = _keras_inputs(NAN)
        rows = _np(keras.losses.kl_divergence(yt, yp))
        value = {"NaN row": _kind(float(rows[0])), "other rows": "finite" if np.all(np.isfinite(rows[1:])) else "no"}
        for red in ("sum", "sum_over_batch_size"):
            value[red] = _kind(float(keras.losses.KLDivergence(reduction=red, dtype="float64")(yt, yp)))
    return Measured(value, f"rows {rows}")


@fact(
    "keras.float16_dtype_overflow", "tensorflow",
    "KLDivergence(dtype='float16') on 8x1000 N(0, 3^2) logits overflows to inf at T <= 1 (y_true / y_pred > 65504), "
    "finite from T = 2",
    "mixed-precision users who set the loss dtype to float16 get inf at distillation temperatures",
    {"T=0.5": "+inf", "T=1": "+inf", "T=2": "finite", "T=5": "finite", "T=10": "finite"},
)  # fmt: skip
def _keras_float16_overflow() -> Measured:
    with _tf_cpu() as (_, keras):
        out, vals = {}, []
        for t, case in WIDE.items():
            yt, yp = _keras_inputs(case)
            v = float(keras.losses.KLDivergence(dtype="float16")(yt, yp))
            out[f"T={t:g}"] = _kind(v)
            vals.append(f"T={t:g}: {v:.4g} (exact {float(np.mean(oracle.kl_from_logits(*_logits(case), t))):.4g})")
    return Measured(out, "; ".join(vals))


def _sample_weight_fact(reduction: str, pinned: dict[str, str]) -> None:
    @fact(
        f"keras.sample_weight.{reduction}", "tensorflow",
        f"KLDivergence(reduction={reduction!r}) with per-row (B,), scalar and (B, 1) sample weights",
        "weighted distillation (per-example teacher confidence) depends on which total is divided by what",
        pinned,
    )  # fmt: skip
    def probe() -> Measured:
        with _tf_cpu() as (_, keras):
            yt, yp = _keras_inputs(SMALL)
            rows = _np(keras.losses.kl_divergence(yt, yp))
            b = rows.size
            w = np.arange(1.0, b + 1.0)  # 1, 2, 3, 4: distinct, and sum(w) differs from b
            loss = keras.losses.KLDivergence(reduction=reduction, dtype="float64")
            out, details = {}, []
            for label, weight, ws in (("per-row (B,)", w, w), ("scalar", 2.0, np.full(b, 2.0)),
                                      ("(B, 1)", w[:, None], w)):  # fmt: skip
                v = _np(loss(yt, yp, sample_weight=weight))
                wr = ws * rows
                if reduction == "none":
                    shape = "(B, 1)" if v.shape == (b, 1) else ("(B,)" if v.shape == (b,) else str(v.shape))
                    same = np.all(np.abs(v.ravel() - wr) <= same_sum("float64", 1, 1.0) * np.abs(wr))
                    out[label] = f"w * row, shape {shape}" if same else f"other, shape {shape}"
                    continue
                total = float(np.sum(wr))
                cands = {"sum w*r": (total, 1.0), "sum w*r / B": (total / b, float(b)),
                         "sum w*r / sum w": (total / float(np.sum(ws)), float(np.sum(ws))),
                         "sum w*r / w": (total / 2.0, 2.0), "sum r": (float(np.sum(rows)), 1.0)}  # fmt: skip
                if label != "scalar":  # the scalar-only candidates coincide with others otherwise
                    cands = {k: c for k, c in cands.items() if k not in ("sum w*r / w", "sum r")}
                else:
                    cands.pop("sum w*r / w")  # = sum r for w = 2
                out[label] = _which(float(v), cands, total, b)
                details.append(f"{label}: {float(v):.10g}")
        return Measured(out, f"rows {rows.round(6)}, w = {w}; " + ", ".join(details))


for _red, _pinned in {
    "sum": {"per-row (B,)": "sum w*r", "scalar": "sum w*r", "(B, 1)": "sum w*r"},
    "sum_over_batch_size": {"per-row (B,)": "sum w*r / B", "scalar": "sum w*r / B", "(B, 1)": "sum w*r / B"},
    "mean": {"per-row (B,)": "sum w*r / B", "scalar": "sum w*r / B", "(B, 1)": "sum w*r / B"},
    # a scalar weight w is divided out again (sum of weights = w, not B*w): the result is sum r
    "mean_with_sample_weight": {"per-row (B,)": "sum w*r / sum w", "scalar": "sum r", "(B, 1)": "sum w*r / sum w"},
    "none": {"per-row (B,)": "w * row, shape (B,)", "scalar": "w * row, shape (B,)", "(B, 1)": "w * row, shape (B, 1)"},
}.items():  # fmt: skip
    _sample_weight_fact(_red, _pinned)


@fact(
    "keras.clip_zero_gradient", "tensorflow",
    "the gradient w.r.t. y_pred is exactly 0 where y_pred < 1e-7 (the clip's derivative), nonzero elsewhere",
    "classes the student rules out get no gradient: at T = 0.5 most of the vocabulary stops learning",
    {"below eps": "exactly 0", "at or above eps": "nonzero"},
)  # fmt: skip
def _keras_clip_grad() -> Measured:
    with _tf_cpu() as (tf, keras):
        yt, yp = _keras_inputs(WIDE[0.5], "float32")
        with tf.GradientTape() as tape:
            tape.watch(yp)
            loss = keras.losses.kl_divergence(yt, yp)
        g, q = _np(tape.gradient(loss, yp)), _np(yp)
    eps = float(round_to(np.asarray(oracle.KERAS_EPSILON), "float32"))
    below = q < eps
    value = {"below eps": "exactly 0" if np.all(g[below] == 0) else "nonzero",
             "at or above eps": "nonzero" if np.all(g[~below] != 0) else "some 0"}  # fmt: skip
    return Measured(value, f"{int(below.sum())} of {below.size} probabilities below eps at T = 0.5")


@fact(
    "keras.float16_function_gradient_overflow", "tensorflow",
    "keras.losses.kl_divergence on float16 probabilities: the gradient w.r.t. the student logits is inf/NaN "
    "(TF's division gradient (-y_true / y_pred) / y_pred exceeds 65504) on every row at T = 1 and 2, although "
    "the loss is finite at T = 2",
    "float16 training through this function gets non-finite gradients at ordinary temperatures",
    {"T=1": "all rows non-finite", "T=2": "all rows non-finite", "T=10": "finite"},
)  # fmt: skip
def _keras_float16_grad() -> Measured:
    with _tf_cpu() as (tf, keras):
        out, details = {}, []
        for t in (1.0, 2.0, 10.0):
            tl, sl = _logits(WIDE[t], "float16")
            tt, ss = (tf.cast(tf.constant(x), "float16") for x in (tl, sl))
            with tf.GradientTape() as tape:
                tape.watch(ss)
                loss = keras.losses.kl_divergence(tf.nn.softmax(tt / t, axis=-1), tf.nn.softmax(ss / t, axis=-1))
            g = _np(tape.gradient(loss, ss))
            bad = ~np.all(np.isfinite(g), axis=-1)
            out[f"T={t:g}"] = ("all rows non-finite" if bad.all() else "finite" if not bad.any()
                               else f"{int(bad.sum())} of {bad.size} rows non-finite")  # fmt: skip
            details.append(f"T={t:g}: loss finite rows {int(np.sum(np.isfinite(_np(loss))))}/{bad.size}, "
                           f"gradient non-finite rows {int(bad.sum())}/{bad.size}")  # fmt: skip
    return Measured(out, "; ".join(details))


# --------------------------------------------------------------------------------------- repro


def main(argv: list[str] | None = None) -> int:
    """Print the named facts (default: all) as measured now; exit status 1 if any no longer holds."""
    names = argv if argv is not None else sys.argv[1:]
    unknown = [n for n in names if n not in FACTS]
    if unknown:
        print(f"unknown fact {unknown[0]!r}; known: {', '.join(FACTS)}", file=sys.stderr)
        return 2
    failed = 0
    for f in (FACTS[n] for n in names or FACTS):
        if not REGISTRY[f.framework].available():
            print(f"{f.name}: skipped, {REGISTRY[f.framework].missing_reason()}")
            continue
        ok, _, msg = check(f)
        failed += not ok
        print(msg)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
