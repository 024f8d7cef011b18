"""Pinned facts of torch's ``kl_div`` / ``KLDivLoss``: each a behaviour a distillation user relies on,
re-measured on every run (see ``klparity.engine.pinned``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from klparity.apis.pinning import (
    HOT,
    IDENTICAL,
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
    to_np,
    which,
)
from klparity.frameworks.torch_adapter import torch_module as _torch
from klparity.model import Measured
from klparity.numerics import oracle
from klparity.numerics.cases import Case
from klparity.numerics.errormodel import budget
from klparity.numerics.exact import exact_of


def _torch_inputs(case: Case, dtype: str = "float64") -> tuple[Any, Any, Any]:
    """(log q, p, log p) as torch tensors of ``dtype``, computed by torch from the case's logits / T."""
    torch = _torch()
    t, s = logits_in(case, dtype)
    tt, ss = (torch.from_numpy(x).to(getattr(torch, dtype)) / case.temperature for x in (t, s))
    fn = torch.nn.functional
    return fn.log_softmax(ss, dim=-1), fn.softmax(tt, dim=-1), fn.log_softmax(tt, dim=-1)


TORCH_MEAN_TEXT = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)




@fact(
    "torch.default_reduction_mean", "torch",
    "F.kl_div and nn.KLDivLoss default to reduction='mean' = sum / numel (B*C), with a UserWarning",
    "the default is not the KL divergence: it is C times too small; 'batchmean' is the mathematical one",
    {"F.kl_div": "numel", "nn.KLDivLoss": "numel", "warning": f"UserWarning: {TORCH_MEAN_TEXT}"},
)  # fmt: skip
def _torch_default_mean() -> Measured:
    torch = _torch()
    x, p, _ = _torch_inputs(SMALL)
    pointwise = to_np(torch.nn.functional.kl_div(x, p, reduction="none"))
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
        with recorded_warnings() as caught:
            res = torch.nn.functional.kl_div(x, p) if name == "F.kl_div" else torch.nn.KLDivLoss()(x, p)
            value = float(res)
        out[name] = which(value, cands, abs_sum, n)
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
        pointwise = to_np(torch.nn.functional.kl_div(x, p, reduction="none"))
        total, shape = float(np.sum(pointwise)), case.shape
        divs = {"1-D (C,)": {"C": shape[0], "1": 1},
                "2-D (B, C)": {"B": shape[0], "C": shape[-1], "numel": math.prod(shape), "1": 1},
                "3-D (B, S, C)": {"B": shape[0], "B*S": math.prod(shape[:-1]), "numel": math.prod(shape),
                                  "1": 1}}[label]  # fmt: skip
        cands = {k: (total / d, float(d)) for k, d in divs.items()}
        value = float(torch.nn.functional.kl_div(x, p, reduction="batchmean"))
        out[label] = which(value, cands, float(np.sum(np.abs(pointwise))), pointwise.size)
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
    with recorded_warnings() as caught:
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
    pw = to_np(torch.nn.functional.kl_div(x, lp, reduction="none", log_target=True))
    masked = to_np(lp) == -np.inf
    total = float(torch.nn.functional.kl_div(x, lp, reduction="sum", log_target=True))
    value = {"pointwise at the -inf class": "nan" if np.all(np.isnan(pw[masked])) else "not all nan",
             "other classes": "finite" if np.all(np.isfinite(pw[~masked])) else "not all finite",
             "sum": kind(total)}  # fmt: skip
    exact = float(np.sum(oracle.kl_from_logits(*logits_in(TEACHER_MASKED))))
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
    with recorded_warnings() as caught:
        try:
            total = float(torch.nn.functional.kl_div(x, lp, reduction="sum"))
        except Exception as e:  # a future release may refuse: that is the change this fact watches
            raised = type(e).__name__
    value = {"sum": kind(total), "warnings": "; ".join(str(w.message) for w in caught) or "none", "raised": raised}
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
    exact = float(np.sum(oracle.kl_from_logits(*logits_in(MASKED))))
    return Measured({"sum": kind(total), "exact": kind(exact)}, f"torch {total!r}, exact {exact:.17g}")


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
    exact = float(np.sum(oracle.kl_from_logits(*logits_in(STUDENT_MASKED))))
    return Measured({"sum": kind(total), "exact": kind(exact)}, f"torch {total!r}")


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
    pw = to_np(torch.nn.functional.kl_div(x, p, reduction="none"))
    rows = np.sum(pw, axis=-1)  # float64 sum of torch's float32 terms
    torch_rows = to_np(torch.nn.functional.kl_div(x, p, reduction="none").sum(dim=-1))
    kind = "all exactly 0" if np.all(torch_rows == 0) and np.all(pw == 0) else "not all exactly 0"
    ex = exact_of(*logits_in(IDENTICAL, "float32"), IDENTICAL.temperature)
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
    exact = float(np.mean(oracle.kl_from_logits(*logits_in(HOT, "float16"), HOT.temperature)))
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
    rows = np.sum(to_np(torch.nn.functional.kl_div(x, p, reduction="none")), axis=-1)
    value: dict[str, str] = {"NaN row": kind(float(rows[0])),
                             "other rows": "finite" if np.all(np.isfinite(rows[1:])) else "not all finite"}  # fmt: skip
    with recorded_warnings():  # 'mean' warns (pinned by torch.default_reduction_mean)
        for red in ("sum", "batchmean", "mean"):
            value[red] = kind(float(torch.nn.functional.kl_div(x, p, reduction=red)))
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
    t, s = logits_in(TEACHER_MASKED)
    out, detail = {}, []
    for log_target in (False, True):
        tt = torch.from_numpy(t).requires_grad_(True)
        ss = torch.from_numpy(s).requires_grad_(True)
        tgt = fn.log_softmax(tt, dim=-1) if log_target else fn.softmax(tt, dim=-1)
        loss = fn.kl_div(fn.log_softmax(ss, dim=-1), tgt, reduction="sum", log_target=log_target)
        g_t, g_s = (to_np(g) for g in torch.autograd.grad(loss, (tt, ss)))
        rows_nan = np.all(np.isnan(g_t), axis=-1)
        out[f"log_target={log_target} teacher grad"] = (
            "row nan" if rows_nan.all() else f"{int(rows_nan.sum())} of {rows_nan.size} rows nan"
        )
        out["student grad"] = "finite" if np.all(np.isfinite(g_s)) else "not finite"
        detail.append(f"log_target={log_target}: {int(rows_nan.sum())} NaN teacher-gradient rows")
    return Measured(out, "; ".join(detail) + f" (every row of {TEACHER_MASKED.id} has a -inf teacher logit)")
