"""Pinned facts of Keras's ``KLDivergence`` / ``kl_divergence``: each a behaviour a distillation user
relies on, re-measured on every run (see ``klparity.engine.pinned``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import numpy as np

from klparity.apis.keras_kl_divergence import formula as keras_formula
from klparity.apis.pinning import (
    HOT,
    IDENTICAL,
    MASKED,
    NAN,
    ONE_D,
    SMALL,
    STUDENT_MASKED,
    THREE_D,
    WIDE,
    fact,
    kind,
    logits_in,
    to_np,
    which,
)
from klparity.frameworks.keras_adapter import tf_module
from klparity.model import Measured
from klparity.numerics import oracle
from klparity.numerics.cases import Case
from klparity.numerics.dtypes import round_to
from klparity.numerics.errormodel import same_sum


def _tf() -> tuple[ModuleType, ModuleType]:
    tf = tf_module()  # memory growth and threads set before TensorFlow's runtime starts
    import keras

    return tf, keras


@contextmanager
def _tf_cpu() -> Iterator[tuple[ModuleType, ModuleType]]:
    tf, keras = _tf()
    with tf.device("/CPU:0"):
        yield tf, keras


def _keras_inputs(case: Case, dtype: str = "float64") -> tuple[Any, Any]:
    """(y_true, y_pred) = softmax(t / T), softmax(s / T) computed by TensorFlow in ``dtype``."""
    tf, _ = _tf()
    t, s = logits_in(case, dtype)
    return (tf.nn.softmax(tf.cast(tf.constant(x), dtype) / case.temperature, axis=-1) for x in (t, s))  # type: ignore[return-value]




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
        rows = to_np(keras.losses.kl_divergence(yt, yp))
        total = float(np.sum(rows))
        value = float(loss(yt, yp))
    cands = {"rows": (total / rows.size, float(rows.size)), "sum": (total, 1.0), "numel": (total / 40, 40.0)}
    return Measured({"reduction": str(loss.reduction), "value": which(value, cands, total, rows.size)},
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
            label = which(float(v), {"the row": (row, 1.0), "row / C": (row / c, float(c))}, row, c)
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
        rows = to_np(keras.losses.kl_divergence(yt, yp))
        value = float(keras.losses.KLDivergence(dtype="float64")(yt, yp))
    total, (b, s, _) = float(np.sum(rows)), THREE_D.shape
    cands = {"B*S": (total / (b * s), float(b * s)), "B": (total / b, float(b)), "1": (total, 1.0)}
    return Measured(which(value, cands, total, rows.size), f"{value:.17g}, rows sum {total:.17g}, B={b}, S={s}")


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
    return Measured(eps, f"epsilon() = {eps!r}, keras_formula.KERAS_EPSILON = {keras_formula.KERAS_EPSILON!r}")


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
    exact = float(np.sum(oracle.kl_from_logits(*logits_in(MASKED))))
    return Measured(kind(v), f"Keras {v:.17g}, exact {exact:.17g}")


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
    exact = float(np.sum(oracle.kl_from_logits(*logits_in(STUDENT_MASKED))))
    return Measured({"sum": kind(v), "exact": kind(exact)}, f"Keras sum {v:.6g}")


@fact(
    "keras.identical_exactly_zero", "tensorflow",
    "identical float32 y_true and y_pred give exactly 0 per row (log(t / t) = log 1 = 0)",
    "unlike torch's probability-target path, which leaves rounding noise of both signs",
    "exactly 0",
)  # fmt: skip
def _keras_identical() -> Measured:
    with _tf_cpu() as (_, keras):
        yt, _ = _keras_inputs(IDENTICAL, "float32")
        rows = to_np(keras.losses.kl_divergence(yt, yt))
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
        rows = to_np(keras.losses.kl_divergence(yt, yp))
    exact = oracle.kl_from_logits(*logits_in(HOT, "float16"), HOT.temperature)
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
        rows = to_np(keras.losses.kl_divergence(yt, yp))
        value = {"NaN row": kind(float(rows[0])), "other rows": "finite" if np.all(np.isfinite(rows[1:])) else "no"}
        for red in ("sum", "sum_over_batch_size"):
            value[red] = kind(float(keras.losses.KLDivergence(reduction=red, dtype="float64")(yt, yp)))
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
            out[f"T={t:g}"] = kind(v)
            vals.append(f"T={t:g}: {v:.4g} (exact {float(np.mean(oracle.kl_from_logits(*logits_in(case), t))):.4g})")
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
            rows = to_np(keras.losses.kl_divergence(yt, yp))
            b = rows.size
            w = np.arange(1.0, b + 1.0)  # 1, 2, 3, 4: distinct, and sum(w) differs from b
            loss = keras.losses.KLDivergence(reduction=reduction, dtype="float64")
            out, details = {}, []
            for label, weight, ws in (("per-row (B,)", w, w), ("scalar", 2.0, np.full(b, 2.0)),
                                      ("(B, 1)", w[:, None], w)):  # fmt: skip
                v = to_np(loss(yt, yp, sample_weight=weight))
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
                out[label] = which(float(v), cands, total, b)
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
        g, q = to_np(tape.gradient(loss, yp)), to_np(yp)
    eps = float(round_to(np.asarray(keras_formula.KERAS_EPSILON), "float32"))
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
            tl, sl = logits_in(WIDE[t], "float16")
            tt, ss = (tf.cast(tf.constant(x), "float16") for x in (tl, sl))
            with tf.GradientTape() as tape:
                tape.watch(ss)
                loss = keras.losses.kl_divergence(tf.nn.softmax(tt / t, axis=-1), tf.nn.softmax(ss / t, axis=-1))
            g = to_np(tape.gradient(loss, ss))
            bad = ~np.all(np.isfinite(g), axis=-1)
            out[f"T={t:g}"] = ("all rows non-finite" if bad.all() else "finite" if not bad.any()
                               else f"{int(bad.sum())} of {bad.size} rows non-finite")  # fmt: skip
            details.append(f"T={t:g}: loss finite rows {int(np.sum(np.isfinite(to_np(loss))))}/{bad.size}, "
                           f"gradient non-finite rows {int(bad.sum())}/{bad.size}")  # fmt: skip
    return Measured(out, "; ".join(details))
