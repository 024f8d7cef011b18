"""Pinned facts of MLX's ``mlx.nn.losses.kl_div_loss`` and of the MLX behaviours its spec and adapter rely on
(see ``klparity.engine.pinned``): the argument order, default and 'mean' divisor; float64 arrays silently made
float32; float64 ``exp`` only float32-accurate (why the adapter claims no float64); the NaN of a masked
teacher class; ``exp`` flushing float32 subnormals; sums added one term at a time (``SEQUENTIAL_SUMS``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from klparity.apis.pinning import (
    MASKED,
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
from klparity.frameworks.mlx_adapter import MlxAdapter
from klparity.model import Measured
from klparity.numerics import oracle
from klparity.numerics.cases import Case
from klparity.numerics.dtypes import dtype_info
from klparity.numerics.errormodel import budget


def _adapter() -> MlxAdapter:
    adapter = REGISTRY["mlx"]
    assert isinstance(adapter, MlxAdapter)
    return adapter


def _mx() -> ModuleType:
    return _adapter()._mx()


def _nn() -> ModuleType:
    return _adapter()._nn()


def _log_probs(case: Case, dtype: str) -> tuple[Any, Any]:
    """(student, teacher) log_softmax(logits / T) computed by MLX in ``dtype``, from the case's logits."""
    nn = _nn()
    adapter = _adapter()
    t, s = logits_in(case, dtype)
    typed = {"float64": np.float64, "float32": np.float32}[dtype]
    ss, tt = adapter.to_mlx(s.astype(typed)), adapter.to_mlx(t.astype(typed))
    return nn.log_softmax(ss / case.temperature, axis=-1), nn.log_softmax(tt / case.temperature, axis=-1)


@fact(
    "mlx.kl_div_loss_is_forward_kl_per_row", "mlx",
    "kl_div_loss(log_softmax(s/T), log_softmax(t/T)) with no reduction argument is KL(teacher ‖ student) "
    "per row: the student (inputs) first, both arguments log-probabilities, default reduction 'none' "
    "(one value per row, the batch shape), no T²",
    "the argument order of F.kl_div (input = student) with log_target=True always, but unreduced by default "
    "where torch's default is 'mean' over every element: ported code that relies on the default changes meaning",
    {"rows": "KL(second ‖ first)", "shape": "batch shape"},
)  # fmt: skip
def _forward_per_row() -> Measured:
    nn = _nn()
    log_q, log_p = _log_probs(SMALL, "float32")
    with recorded_warnings():
        got = _adapter().to_float64(nn.losses.kl_div_loss(log_q, log_p))
    t, s = logits_in(SMALL, "float32")
    fwd = oracle.kl_from_logits(t, s, SMALL.temperature)
    rev = oracle.kl_from_logits(s, t, SMALL.temperature)
    close = {}
    for name, (a, b) in {"KL(second ‖ first)": (t, s), "KL(first ‖ second)": (s, t)}.items():
        lp, lq = oracle.log_softmax(a, SMALL.temperature), oracle.log_softmax(b, SMALL.temperature)
        tol = budget(framework="mlx", input_dtype="float32", compute_dtype="float32", p=np.exp(lp), q=np.exp(lq),
                     zt=a / SMALL.temperature, zs=b / SMALL.temperature, student_is_probability=False,
                     log_p=lp, log_q=lq).rows()  # fmt: skip
        ref = fwd if name == "KL(second ‖ first)" else rev
        close[name] = got.shape == ref.shape and bool(np.all(np.abs(got - ref) <= tol))
    rows = [k for k, v in close.items() if v]
    value = {"rows": rows[0] if len(rows) == 1 else f"none of {sorted(close)}" if not rows else "ambiguous",
             "shape": "batch shape" if got.shape == t.shape[:-1] else str(got.shape)}  # fmt: skip
    return Measured(value, f"rows {got.tolist()}; KL(teacher ‖ student) {fwd.tolist()}; reverse {rev.tolist()}")


@fact(
    "mlx.mean_divides_by_rows", "mlx",
    "kl_div_loss(reduction='mean') is mx.mean of the per-row values: on (B, S, C) it divides the sum by B·S "
    "(every row), not by B; 'sum' is the plain sum",
    "a sequence model's 'mean' is per token, not per sequence as torch's 'batchmean' (÷ size(0)) is",
    {"mean": "B*S (all rows)", "sum": "sum"},
)  # fmt: skip
def _mean_divisor() -> Measured:
    nn = _nn()
    adapter = _adapter()
    log_q, log_p = _log_probs(THREE_D, "float64")  # float64 sums: the candidates differ only by their divisor
    with recorded_warnings():
        rows = adapter.to_float64(nn.losses.kl_div_loss(log_q, log_p, reduction="none"))
        mean = float(adapter.to_float64(nn.losses.kl_div_loss(log_q, log_p, reduction="mean")))
        total = float(adapter.to_float64(nn.losses.kl_div_loss(log_q, log_p, reduction="sum")))
    b, n = THREE_D.shape[0], rows.size
    s, abs_sum = float(np.sum(rows)), float(np.sum(np.abs(rows)))
    cands = {"B*S (all rows)": (s / n, float(n)), "B": (s / b, float(b)), "sum": (s, 1.0),
             "B*S*C (numel)": (s / (n * THREE_D.shape[-1]), float(n * THREE_D.shape[-1]))}  # fmt: skip
    value = {"mean": which(mean, cands, abs_sum, n), "sum": which(total, cands, abs_sum, n)}
    return Measured(value, f"mean {mean!r}, sum {total!r}, per-row values {rows.tolist()}")


@fact(
    "mlx.array_of_float64_is_float32", "mlx",
    "mx.array(a) of a float64 NumPy array silently makes a float32 array; dtype=mx.float64 keeps float64",
    "a float64 pipeline that converts without dtype= computes in float32 with no warning",
    {"mx.array(float64 ndarray)": "float32", "mx.array(float64 ndarray, dtype=mx.float64)": "float64"},
)  # fmt: skip
def _float64_to_float32() -> Measured:
    mx = _mx()
    t, _ = logits_in(SMALL)
    with recorded_warnings() as caught:
        plain, typed = mx.array(t), mx.array(t, dtype=mx.float64)
    name = MlxAdapter.dtype_name
    return Measured({"mx.array(float64 ndarray)": name(plain), "mx.array(float64 ndarray, dtype=mx.float64)":
                     name(typed)}, f"warnings: {[str(w.message) for w in caught]}")  # fmt: skip


#: Relative error that no float64 exp reaches (float64's unit roundoff is 1.1e-16) and a float32-accurate one
#: exceeds by orders of magnitude: a qualitative line between the two, not a tolerance.
FLOAT32_SIZED = 1e-12


@fact(
    "mlx.float64_exp_is_float32_accurate", "mlx",
    "on the CPU, mx.exp and mx.logsumexp of float64 arrays return float64 with float32-sized errors (max relative "
    "error above 1e-12 on exp(linspace(-20, 20, 1001)); measured 1.8e-6) and exp underflows at float32's range "
    "(exp(-700) = 0, exact 9.9e-305), while mx.log is float64-accurate",
    "kl_div_loss's exp(targets) and the log-softmax's logsumexp carry ~1e-7 relative errors in float64: the "
    "MLX adapter claims no float64 (its cells would test float32 accuracy against a float64 error model)",
    {"exp": "float32-sized", "logsumexp": "float32-sized", "log": "float64-accurate", "exp(-700)": "0"},
)  # fmt: skip
def _float64_exp() -> Measured:
    mx = _mx()
    x = np.linspace(-20.0, 20.0, 1001)
    arr = mx.array(x, dtype=mx.float64)
    got = {
        "exp": (mx.exp(arr), np.exp(x)),
        "logsumexp": (mx.logsumexp(arr, axis=-1), np.asarray(np.log(np.sum(np.exp(x - 20.0))) + 20.0)),
        "log": (mx.log(mx.abs(arr) + 2.0), np.log(np.abs(x) + 2.0)),
    }
    value, detail = {}, []
    for name, (res, ref) in got.items():
        if res.dtype != mx.float64:
            value[name] = f"computed in {MlxAdapter.dtype_name(res)}"
            continue
        rel = float(np.max(np.abs(_adapter().to_float64(res) - ref) / np.abs(ref)))
        value[name] = "float32-sized" if rel > FLOAT32_SIZED else "float64-accurate"
        detail.append(f"{name} max relative error {rel:.3g}")
    tiny = float(_adapter().to_float64(mx.exp(mx.array([-700.0], dtype=mx.float64)))[0])
    value["exp(-700)"] = "0" if tiny == 0 else "nonzero"
    detail.append(f"exp(-700) = {tiny!r}")
    return Measured(value, "; ".join(detail))


@fact(
    "mlx.masked_teacher_class_nan", "mlx",
    "kl_div_loss gives NaN on a row with a class whose teacher log-probability is -inf (masked in both teacher "
    "and student, or in the teacher only): exp(-inf) * (-inf - x) = 0 * -inf; +inf where only the student is -inf",
    "a masked vocabulary (-inf logits) makes the loss NaN: mask the classes out before the loss, not with -inf",
    {"masked both": "nan", "teacher masked": "nan", "student masked": "+inf"},
)  # fmt: skip
def _masked_nan() -> Measured:
    nn = _nn()
    out: dict[str, str] = {}
    detail = []
    for name, case in (("masked both", MASKED), ("teacher masked", TEACHER_MASKED), ("student masked", STUDENT_MASKED)):
        log_q, log_p = _log_probs(case, "float32")
        with recorded_warnings():
            rows = _adapter().to_float64(nn.losses.kl_div_loss(log_q, log_p))
        kinds = sorted({kind(float(v)) for v in rows})
        out[name] = kinds[0] if len(kinds) == 1 else f"mixed {kinds}"
        detail.append(f"{name}: {rows.tolist()}")
    return Measured(out, "; ".join(detail))


@fact(
    "mlx.exp_flushes_float32_subnormals", "mlx",
    "on the CPU, mx.exp in float32 returns 0 where the exact result is a subnormal below ~0.71 of the smallest "
    "normal number (exp(-87.7) = 8.2e-39 comes out 0), and in float16 keeps subnormal results (exp(-16) = 1.1e-7)",
    "a teacher probability of ~1e-38 is 0 to MLX in float32 and bfloat16: against a -inf student, 0 * inf = NaN "
    "(the spec's mlx.underflow_times_inf_nan predicate treats float32 and bfloat16 as flushing, float16 not)",
    {"float32 exp(-87.7)": "0", "float32 exp(-87.6)": "subnormal", "float16 exp(-16)": "subnormal"},
)  # fmt: skip
def _exp_flush() -> Measured:
    mx = _mx()
    adapter = _adapter()
    out, detail = {}, []
    for label, dtype, x in (("float32 exp(-87.7)", "float32", -87.7), ("float32 exp(-87.6)", "float32", -87.6),
                            ("float16 exp(-16)", "float16", -16.0)):  # fmt: skip
        got = float(adapter.to_float64(mx.exp(adapter.to_mlx(np.array([x], dtype)))[0]))
        info = dtype_info(dtype)
        out[label] = "0" if got == 0 else ("subnormal" if got < info.smallest_normal else "normal")
        detail.append(f"{label} = {got!r} (exact {np.exp(x):.6g})")
    return Measured(out, "; ".join(detail))


@fact(
    "mlx.sum_is_sequential", "mlx",
    "on the CPU, mx.sum of a float32 row adds its terms one by one, left to right (bit for bit a float32 loop), "
    "not pairwise: n - 1 roundings over n terms",
    "the error of kl_div_loss's class sum and of log_softmax's logsumexp grows with n, not log2 n: the "
    "tolerance model's SEQUENTIAL_SUMS rows rely on it (a pairwise MLX would be held to a tighter bound)",
    {"float32 sum of 32000": "sequential"},
)  # fmt: skip
def _sequential_sum() -> Measured:
    mx = _mx()
    terms = np.exp(logits_in(Case("gauss", (2, 32000), 1.0, 3.0), "float32")[0]).astype(np.float32)
    got = _adapter().to_float64(mx.sum(mx.array(terms, dtype=mx.float32), axis=-1))
    sequential = np.add.accumulate(terms, axis=-1, dtype=np.float32)[..., -1].astype(np.float64)
    pairwise = np.sum(terms, axis=-1, dtype=np.float32).astype(np.float64)
    if np.array_equal(got, sequential):
        how = "sequential"
    elif np.array_equal(got, pairwise):
        how = "pairwise (as NumPy)"
    else:
        how = "neither sequential nor NumPy's pairwise"
    exact = np.sum(terms.astype(np.float64), axis=-1)
    errors = {name: (np.abs(v - exact) / exact).tolist() for name, v in
              (("MLX", got), ("sequential", sequential), ("pairwise", pairwise))}  # fmt: skip
    return Measured({"float32 sum of 32000": how}, f"relative errors: {errors}")
