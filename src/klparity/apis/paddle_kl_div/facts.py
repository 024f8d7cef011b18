"""Pinned facts of Paddle's ``paddle.nn.functional.kl_div`` and the (log_)softmax that feeds it: each a
behaviour a distillation user relies on, re-measured on every run (see ``klparity.engine.pinned``).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

from klparity.apis.paddle_kl_div import CLIP
from klparity.apis.pinning import (
    MASKED,
    NAN,
    ONE_D,
    SMALL,
    STUDENT_MASKED,
    TEACHER_MASKED,
    THREE_D,
    fact,
    kind,
    logits_in,
    recorded_warnings,
    which,
)
from klparity.frameworks import REGISTRY
from klparity.frameworks.paddle_adapter import PaddleAdapter, dtype_name, to_float64
from klparity.model import Measured
from klparity.numerics import oracle
from klparity.numerics.cases import Case
from klparity.numerics.errormodel import same_sum


def _paddle() -> ModuleType:
    adapter = REGISTRY["paddle"]
    assert isinstance(adapter, PaddleAdapter)
    return adapter._paddle()  # thread settings applied, import-time warnings recorded


def _tensor(x: Any, dtype: str = "float64") -> Any:
    """A NumPy array as a CPU tensor of ``dtype`` (the values are representable: exact)."""
    paddle = _paddle()
    return paddle.to_tensor(np.asarray(x, dtype), place=paddle.CPUPlace())


def _paddle_inputs(case: Case, dtype: str = "float64") -> tuple[Any, Any, Any]:
    """(log q, p, log p) as Paddle tensors of ``dtype``, computed by Paddle from the case's logits / T."""
    fn = _paddle().nn.functional
    t, s = logits_in(case, dtype)
    tt, ss = _tensor(t, dtype) / case.temperature, _tensor(s, dtype) / case.temperature
    return fn.log_softmax(ss, axis=-1), fn.softmax(tt, axis=-1), fn.log_softmax(tt, axis=-1)


def _kl_div(inp: Any, label: Any, **kwargs: Any) -> Any:
    return _paddle().nn.functional.kl_div(inp, label, **kwargs)


@fact(
    "paddle.default_reduction_mean", "paddle",
    "F.kl_div defaults to reduction='mean' = sum / numel (B*C), silently (torch warns about the same default)",
    "the default is not the KL divergence: it is C times too small; 'batchmean' is the mathematical one",
    {"F.kl_div": "numel", "nn.KLDivLoss": "numel", "warnings": "none"},
)  # fmt: skip
def _paddle_default_mean() -> Measured:
    paddle = _paddle()
    x, p, _ = _paddle_inputs(SMALL)
    pointwise = to_float64(_kl_div(x, p, reduction="none"))
    b, n, c = pointwise.shape[0], pointwise.size, pointwise.shape[-1]
    total, abs_sum = float(np.sum(pointwise)), float(np.sum(np.abs(pointwise)))
    cands = {
        "numel": (total / n, float(n)),
        "B": (total / b, float(b)),
        "sum": (total, 1.0),
        "C": (total / c, float(c)),
    }
    out: dict[str, str] = {}
    texts, values = set(), []
    for name in ("F.kl_div", "nn.KLDivLoss"):
        with recorded_warnings() as caught:
            value = float(_kl_div(x, p) if name == "F.kl_div" else paddle.nn.KLDivLoss()(x, p))
        out[name] = which(value, cands, abs_sum, n)
        values.append(f"{name} {value:.17g}")
        texts |= {f"{w.category.__name__}: {w.message}" for w in caught}
    out["warnings"] = " | ".join(sorted(texts)) or "none"
    return Measured(out, f"sum {total:.17g} over {n} elements ({b} rows of {c}); " + ", ".join(values))


@fact(
    "paddle.batchmean_divisor", "paddle",
    "reduction='batchmean' divides by input.shape[0]: C for 1-D input, B (not B*S) for (B, S, C)",
    "on a (B, S, C) sequence batch 'batchmean' is S times the per-token KL; a 1-D distribution is not a batch",
    {"1-D (C,)": "C", "2-D (B, C)": "B", "3-D (B, S, C)": "B"},
)  # fmt: skip
def _paddle_batchmean() -> Measured:
    out, details = {}, []
    for label, case in (("1-D (C,)", ONE_D), ("2-D (B, C)", SMALL), ("3-D (B, S, C)", THREE_D)):
        x, p, _ = _paddle_inputs(case)
        pointwise = to_float64(_kl_div(x, p, reduction="none"))
        total, shape = float(np.sum(pointwise)), case.shape
        divs = {"1-D (C,)": {"C": shape[0], "1": 1},
                "2-D (B, C)": {"B": shape[0], "C": shape[-1], "numel": math.prod(shape), "1": 1},
                "3-D (B, S, C)": {"B": shape[0], "B*S": math.prod(shape[:-1]), "numel": math.prod(shape),
                                  "1": 1}}[label]  # fmt: skip
        cands = {k: (total / d, float(d)) for k, d in divs.items()}
        value = float(_kl_div(x, p, reduction="batchmean"))
        out[label] = which(value, cands, float(np.sum(np.abs(pointwise))), pointwise.size)
        details.append(f"{label} shape {shape}: batchmean {value:.6g}, sum {total:.6g}")
    return Measured(out, "; ".join(details))


@fact(
    "paddle.zero_target_swallows_nan", "paddle",
    "the kernel returns exactly 0 where the label is <= 0, whatever the input: a NaN student log-probability "
    "and a -inf one (a class masked on both sides) at a zero teacher probability give 0; torch gives NaN for both",
    "a NaN in the student's masked classes goes unnoticed; a masked vocabulary does not poison Paddle's loss",
    {"NaN input, zero label": "0", "-inf input, zero label": "0", "sum": "finite"},
)  # fmt: skip
def _paddle_zero_target() -> Measured:
    t, s = logits_in(TEACHER_MASKED)
    p, lq = oracle.softmax(t, TEACHER_MASKED.temperature), oracle.log_softmax(s, TEACHER_MASKED.temperature)
    zero = p == 0  # masked teacher classes: an exact 0 label (Paddle's own softmax would give e^-64 / S)
    with_nan = np.where(zero, np.nan, lq)
    pw_nan = to_float64(_kl_div(_tensor(with_nan), _tensor(p), reduction="none"))
    tm, sm = logits_in(MASKED)
    pm, lqm = oracle.softmax(tm, MASKED.temperature), oracle.log_softmax(sm, MASKED.temperature)
    both = (pm == 0) & (lqm == -np.inf)
    pw_inf = to_float64(_kl_div(_tensor(lqm), _tensor(pm), reduction="none"))
    total = float(_kl_div(_tensor(with_nan), _tensor(p), reduction="sum"))

    def zeros(values: Any) -> str:
        return "0" if np.all(values == 0) else f"not all 0: {sorted({kind(float(v)) for v in values})}"

    value = {"NaN input, zero label": zeros(pw_nan[zero]), "-inf input, zero label": zeros(pw_inf[both]),
             "sum": kind(total)}  # fmt: skip
    return Measured(value, f"{int(zero.sum())} NaN inputs at zero labels ({TEACHER_MASKED.id}), "
                           f"{int(both.sum())} classes masked on both sides ({MASKED.id}); sum {total!r}")  # fmt: skip


@fact(
    "paddle.log_probs_as_label_silent_zero", "paddle",
    "passing log-probabilities as label without log_target=True gives a loss of exactly 0 (every label <= 0 "
    "counts 0), silently; torch gives NaN for the same mistake",
    "the commonest argument mistake raises nothing, warns nothing and trains nothing: the loss and its "
    "gradient are 0",
    {"sum": "exactly 0", "warnings": "none", "raised": "nothing"},
)  # fmt: skip
def _paddle_log_probs_as_label() -> Measured:
    x, _, lp = _paddle_inputs(SMALL)
    raised, total = "nothing", math.nan
    with recorded_warnings() as caught:
        try:
            total = float(_kl_div(x, lp, reduction="sum"))
        except Exception as e:  # a future release may refuse: that is the change this fact watches
            raised = type(e).__name__
    value = {"sum": "exactly 0" if total == 0.0 else kind(total),
             "warnings": "; ".join(str(w.message) for w in caught) or "none", "raised": raised}  # fmt: skip
    return Measured(value, f"sum {total!r}")


@fact(
    "paddle.unknown_reduction_returns_elementwise", "paddle",
    "an unknown reduction (reduction='batch_mean', a typo) is not rejected: kl_div returns the unreduced "
    "elementwise loss",
    "a typo silently changes the loss's shape and meaning; a later .mean() hides it",
    {"result shape": "input shape", "raised": "nothing"},
)  # fmt: skip
def _paddle_unknown_reduction() -> Measured:
    x, p, _ = _paddle_inputs(SMALL)
    raised, shape = "nothing", "none"
    try:
        res = _kl_div(x, p, reduction="batch_mean")
        shape = "input shape" if tuple(res.shape) == SMALL.shape else str(tuple(res.shape))
    except Exception as e:  # validation added in a release: that is the change this fact watches
        raised = type(e).__name__
    return Measured({"result shape": shape, "raised": raised}, f"input shape {SMALL.shape}")


@fact(
    "paddle.kl_div_half_precision_unsupported_on_cpu", "paddle",
    "float16 and bfloat16 inputs raise on the CPU: no kldiv_loss CPU kernel is registered for them",
    "a mixed-precision training step cannot call kl_div on the CPU; the suite tests float32 and float64 only",
    {"float16": "RuntimeError: kernel not registered", "bfloat16": "RuntimeError: kernel not registered"},
)  # fmt: skip
def _paddle_half() -> Measured:
    x, p, _ = _paddle_inputs(SMALL)
    out, details = {}, []
    for dt in ("float16", "bfloat16"):
        try:
            res = _kl_div(x.astype(dt), p.astype(dt), reduction="sum")
            out[dt] = f"runs ({dtype_name(res)})"
        except Exception as e:  # the missing kernel: whatever Paddle raises is the fact
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            out[dt] = type(e).__name__ + (": kernel not registered" if "not registered" in str(e) else "")
            details.append(f"{dt}: {first[:160]}")
    return Measured(out, "; ".join(details) or "no errors")


@fact(
    "paddle.mixed_dtypes_promote", "paddle",
    "kl_div(float32 input, float64 label) (and the reverse) returns float64, without a warning",
    "a float64 teacher silently upgrades the loss (and its cost); no error flags the mismatch",
    {"float32 input, float64 label": "float64", "float64 input, float32 label": "float64", "warnings": "none"},
)  # fmt: skip
def _paddle_mixed() -> Measured:
    x, p, _ = _paddle_inputs(SMALL)
    with recorded_warnings() as caught:
        a = _kl_div(x.astype("float32"), p, reduction="sum")
        b = _kl_div(x, p.astype("float32"), reduction="sum")
    value = {"float32 input, float64 label": dtype_name(a), "float64 input, float32 label": dtype_name(b),
             "warnings": "; ".join(str(w.message) for w in caught) or "none"}  # fmt: skip
    return Measured(value, f"values {float(a):.9g}, {float(b):.9g}")


@fact(
    "paddle.softmax_clips_at_minus_64", "paddle",
    "F.softmax and F.log_softmax clip z - max z at -64: a masked (-inf) class gets probability e^-64 / S, "
    "not 0, and a finite log-probability; so a student -inf where the teacher has mass gives a finite KL "
    "(the exact one is +inf)",
    "masking logits with -inf does not remove a class from Paddle's distributions; an impossible student "
    "class is penalised by about p (64 + log p) instead of infinitely",
    {"masked class probability": "e^-64 / S", "masked class log-probability": "finite",
     "student -inf sum": "finite", "exact": "+inf"},
)  # fmt: skip
def _paddle_clip() -> Measured:
    _, p, lp = _paddle_inputs(MASKED)
    t, _ = logits_in(MASKED)
    z = t / MASKED.temperature
    y = np.maximum(z - np.max(z, axis=-1, keepdims=True), CLIP)  # -inf -> CLIP
    clipped_p = math.exp(CLIP) / np.sum(np.exp(y), axis=-1, keepdims=True)
    masked = np.isneginf(t)
    got_p, got_lp = to_float64(p), to_float64(lp)
    ratio = (got_p / np.broadcast_to(clipped_p, got_p.shape))[masked]
    x, ps, _ = _paddle_inputs(STUDENT_MASKED)
    total = float(_kl_div(x, ps, reduction="sum"))
    exact = float(np.sum(oracle.kl_from_logits(*logits_in(STUDENT_MASKED), STUDENT_MASKED.temperature)))
    value = {"masked class probability": "e^-64 / S" if np.allclose(ratio, 1.0, rtol=1e-12, atol=0) else
             f"not e^-64 / S (ratio {ratio.min():.6g}..{ratio.max():.6g})",
             "masked class log-probability": "finite" if np.all(np.isfinite(got_lp[masked])) else "not finite",
             "student -inf sum": kind(total), "exact": kind(exact)}  # fmt: skip
    return Measured(value, f"{int(masked.sum())} masked classes ({MASKED.id}): probabilities "
                           f"{got_p[masked].min():.6g}..{got_p[masked].max():.6g}, log-probabilities "
                           f"{got_lp[masked].min():.6g}..{got_lp[masked].max():.6g}; {STUDENT_MASKED.id}: "
                           f"Paddle sum {total:.9g}, exact {exact!r}")  # fmt: skip


@fact(
    "paddle.float32_softmax_swallows_nan", "paddle",
    "a NaN teacher logit (class 5 of 10) vanishes in float32 F.softmax (AVX kernel: _mm256_max_ps(NaN, -64) "
    "= -64, probability e^-64 / S), so kl_div's row and sum stay finite; float64 softmax and log_softmax "
    "(log_target=True) propagate it",
    "a diverged teacher goes unnoticed in float32 training: the NaN is replaced by a near-zero probability",
    {"float32 sum": "finite", "float64 sum": "nan", "float32 log_target=True sum": "nan"},
)  # fmt: skip
def _paddle_nan() -> Measured:
    value, details = {}, []
    for dt in ("float32", "float64"):
        x, p, lp = _paddle_inputs(NAN, dt)
        total = float(_kl_div(x, p, reduction="sum"))
        value[f"{dt} sum"] = kind(total)
        row = to_float64(p)[0]
        details.append(f"{dt}: softmax row 0 {'finite' if np.all(np.isfinite(row)) else 'NaN'}, "
                       f"smallest {np.fmin.reduce(row):.6g}; sum {total!r}")  # fmt: skip
        if dt == "float32":
            value["float32 log_target=True sum"] = kind(float(_kl_div(x, lp, reduction="sum", log_target=True)))
    return Measured(value, f"{NAN.id}, NaN teacher logit at row 0, class {NAN.shape[-1] // 2}: " + "; ".join(details))


@fact(
    "paddle.log_target_neg_inf_nan", "paddle",
    "log_target=True with a -inf log-label gives NaN at that class (exp(-inf) * (-inf - x) = 0 * -inf), as torch",
    "a one-hot or masked teacher passed in log space (computed outside Paddle's clipping log_softmax) "
    "poisons the loss; the exact term is 0",
    {"pointwise at the -inf class": "nan", "other classes": "finite", "sum": "nan"},
)  # fmt: skip
def _paddle_log_target_nan() -> Measured:
    t, s = logits_in(TEACHER_MASKED)
    lp, lq = oracle.log_softmax(t, TEACHER_MASKED.temperature), oracle.log_softmax(s, TEACHER_MASKED.temperature)
    pw = to_float64(_kl_div(_tensor(lq), _tensor(lp), reduction="none", log_target=True))
    masked = lp == -np.inf
    total = float(_kl_div(_tensor(lq), _tensor(lp), reduction="sum", log_target=True))
    value = {"pointwise at the -inf class": "nan" if np.all(np.isnan(pw[masked])) else "not all nan",
             "other classes": "finite" if np.all(np.isfinite(pw[~masked])) else "not all finite",
             "sum": kind(total)}  # fmt: skip
    return Measured(value, f"{int(masked.sum())} -inf log-labels of {masked.size}")


WIDE_VOCAB = Case("gauss", (2, 32000), 1.0, 3.0)


@fact(
    "paddle.float32_mean_accumulates_sequentially", "paddle",
    "reduction='mean' (the default; paddle.mean) sums float32 terms in 8 lanes one by one (about n / 8 "
    "roundings), 'sum' (paddle.sum) in a tree: over the 64000 KL terms of a (2, 32000) batch 'mean' x numel is "
    "off its own terms' exact sum by more than a pairwise sum can be (log2(n) + 2 roundings of u sum|t|), "
    "'sum' is within it",
    "the default reduction is the less accurate one, and its error grows with the vocabulary (the suite's "
    "own-reduction check, which assumes pairwise sums, flags it)",
    {"'mean' within a pairwise sum's error": False, "'sum' within a pairwise sum's error": True},
)  # fmt: skip
def _paddle_mean_sequential() -> Measured:
    x, p, _ = _paddle_inputs(WIDE_VOCAB, "float32")
    pointwise = to_float64(_kl_div(x, p, reduction="none"))
    n, exact, abs_sum = pointwise.size, float(np.sum(pointwise)), float(np.sum(np.abs(pointwise)))
    bound = same_sum("float32", n, abs_sum)
    mean_err = abs(float(_kl_div(x, p, reduction="mean")) * n - exact)
    sum_err = abs(float(_kl_div(x, p, reduction="sum")) - exact)
    value = {"'mean' within a pairwise sum's error": bool(mean_err <= bound),
             "'sum' within a pairwise sum's error": bool(sum_err <= bound)}  # fmt: skip
    return Measured(value, f"{WIDE_VOCAB.id}, {n} float32 terms: 'mean' x n off by {mean_err / bound:.2f}, "
                           f"'sum' by {sum_err / bound:.2f} of the pairwise bound {bound:.3g}")  # fmt: skip
