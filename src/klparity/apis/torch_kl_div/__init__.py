"""``torch.nn.functional.kl_div`` and ``torch.nn.KLDivLoss``: pointwise ``target · (log target − input)``
(or ``exp(t) · (t − input)`` with ``log_target=True``), reductions ``none`` / ``sum`` / ``mean`` (÷ every
element, with a UserWarning) / ``batchmean`` (÷ size(0), the sum rounded first); its gradient through
``log_softmax`` and ``softmax`` op by op; its documented differences, facts (``facts``) and mutants
(``mutants``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar, Final

import numpy as np
from numpy.typing import NDArray

from klparity.apis.base import ApiSpec, GradModel, log_space_golden, overflow_masks, underflow_meets_student_inf
from klparity.apis.torch_kl_div import formula as torch_formula
from klparity.model import Api, Expectation, GoldenExpected, GoldenGradient, GradOutput
from klparity.numerics import errormodel
from klparity.numerics.errormodel import Budget, budget, grad_budget
from klparity.numerics.exact_grads import exact_grads, exp_in, rowsum
from klparity.numerics.goldens import TAG

if TYPE_CHECKING:
    from klparity.model import Exact
    from klparity.numerics.goldens import Golden

F64 = NDArray[np.float64]

MEAN_WARNING: Final = "'mean' divides the total loss by both the batch size and the support size"


def torch_grads(
    target: F64, inp: F64, temperature: float, *, log_target: bool, dtype: str | None = None
) -> tuple[F64, F64]:
    """Gradients of ``sum(kl_div(inp, target))`` w.r.t. the student and teacher logits, in float64.

    Follows torch's backward op by op, IEEE specials included: ``inp = log_softmax(s/T)`` (backward
    g - exp(inp) sum g), ``target = softmax(t/T)`` (backward target (g - sum g target)) or
    ``log_softmax(t/T)`` with ``log_target``; kl_div's pointwise backward is -target for the input
    and xlogy's log(t) + t/t - input (NaN at t = 0) for the target, or -exp(t) and
    exp(t) (t - input) + exp(t) with ``log_target``. ``dtype``: round each exp as torch does, so that
    0 * inf = NaN appears where it does: kl_div's backward computes exp(target) in the tensor's dtype,
    log_softmax's backward computes exp(output) in float32 for float16 / bfloat16 tensors.
    """
    acc = ("float32" if dtype in ("float16", "bfloat16") else dtype) if dtype else None
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if log_target:
            e = exp_in(target, dtype)
            g_in = -e
            g_tgt = e * (target - inp) + e
            g_t = g_tgt - exp_in(target, acc) * rowsum(g_tgt)
        else:
            g_in = -target
            g_tgt = np.where(target == 0, np.nan, np.log(target) + 1.0) - inp
            g_t = target * (g_tgt - rowsum(g_tgt * target))
        g_s = g_in - exp_in(inp, acc) * rowsum(g_in)
    return np.asarray(g_s / temperature, np.float64), np.asarray(g_t / temperature, np.float64)


class TorchKlDiv(ApiSpec):
    """torch's ``kl_div`` (functional and module): see the module docstring."""

    semantics = "torch"
    default_reduction = "mean"
    none_is_elementwise = True
    facts = "klparity.apis.torch_kl_div.facts"
    mutants = "klparity.apis.torch_kl_div.mutants"
    conventions = "klparity.apis.torch_kl_div.conventions"
    #: ``nn.KLDivLoss.forward`` calls ``F.kl_div``, so the quick tier differentiates the function only
    full_tier_only_grad_entries = ("torch.nn.KLDivLoss",)
    differences: ClassVar[dict[str, str]] = {
        "torch.masked_class_nan": "torch computes 0 * log_softmax = 0 * (-inf) = NaN on a class masked "
        "with -inf in both teacher and student; the exact KL gives 0 for that class",
        "torch.log_target_zero_target_nan": "with log_target=True torch computes exp(t) * (t - input) "
        "= 0 * (-inf - x) = NaN where the log-target is -inf; the exact KL gives 0",
        "torch.underflow_times_inf_nan": "a teacher probability that underflows to 0 in the tested dtype, "
        "on a class where the student is -inf, gives 0 * inf = NaN; the exact KL is +inf",
    }
    grad_differences: ClassVar[dict[str, str]] = {
        "torch.target_grad_nan_at_zero_target": "with log_target=False, d kl_div / d target is "
        "xlogy's backward log(t) + t/t = NaN (0/0) where the target is exactly 0 (a -inf teacher logit, "
        "or a probability that underflows the dtype); the softmax backward spreads it over the row. "
        "The exact gradient w.r.t. the teacher logits is finite",
        "torch.log_target_grad_nan_at_neg_inf": "with log_target=True, d/d target of exp(t) (t - input) "
        "is exp(t) (t - input + 1) = 0 * (-inf) = NaN where the log-target is -inf; the log_softmax "
        "backward spreads it over the row. The exact gradient is finite",
        "torch.log_target_grad_underflow_nan": "with log_target=True in float16 / bfloat16, kl_div's backward "
        "computes exp(log-target) in that dtype, where it underflows to 0 (below about -17.3 in float16); where "
        "the student is -inf, (log-target - input) is +inf and 0 * inf makes the whole row NaN. The exact "
        "gradient there is +-inf (the KL is infinite), not NaN",
    }

    def expectations(self, api: Api, ex: Exact, dtype: str, compute: str,
                     framework: str) -> tuple[dict[str, Expectation], Budget]:  # fmt: skip
        bud = budget(framework=framework, input_dtype=dtype, compute_dtype=compute, p=ex.p,
                     q=ex.q, zt=ex.zt, zs=ex.zs, student_is_probability=False, log_p=ex.lp,
                     log_q=ex.lq)  # fmt: skip
        return self.expectations_with(api, ex, bud, compute), bud

    def expectations_shared(
        self, api: Api, ex: Exact, dtype: str, compute: str, framework: str, shared: dict[tuple[object, ...], Budget]
    ) -> tuple[dict[str, Expectation], Budget]:
        """The same budget serves ``log_target`` both ways: made once per (framework, compute dtype)."""
        key = (self.semantics, framework, compute)
        if key not in shared:
            shared[key] = budget(framework=framework, input_dtype=dtype, compute_dtype=compute, p=ex.p,
                                 q=ex.q, zt=ex.zt, zs=ex.zs, student_is_probability=False, log_p=ex.lp,
                                 log_q=ex.lq)  # fmt: skip
        return self.expectations_with(api, ex, shared[key], compute), shared[key]

    def expectations_with(self, api: Api, ex: Exact, bud: Budget, dtype: str) -> dict[str, Expectation]:
        """``expectations`` with a given budget (the scale tier shares one across ``log_target``)."""
        log_target = bool(api.option("log_target", False))
        flushed, maybe = underflow_meets_student_inf(ex, dtype)
        target = np.where(flushed, -np.inf, ex.lp) if log_target else np.where(flushed, 0.0, ex.p)
        pointwise = torch_formula.torch_pointwise(ex.lq, target, log_target=log_target)
        with np.errstate(invalid="ignore"):
            exact_pointwise = np.where(ex.p == 0, 0.0, ex.p * (ex.lp - ex.lq))
        exact_pointwise = np.where(np.isnan(ex.rows)[..., None], np.nan, exact_pointwise)
        out = {}
        for red in api.reductions:
            r = self.resolve(red)
            if r == "none":
                tol: F64 | float = bud.elementwise()
            else:
                tol = bud.total() / {"sum": 1, "mean": pointwise.size, "batchmean": pointwise.shape[0]}[r]
            total = float(np.sum(ex.rows))
            divisor = {"none": 1, "sum": 1, "mean": pointwise.size, "batchmean": pointwise.shape[0]}[r]
            out[red] = Expectation(
                value=torch_formula.torch_reduce(pointwise, r),
                tolerance=tol,
                exact=np.asarray(exact_pointwise) if r == "none" else np.asarray(total / divisor),
                gap_bound=None,
                dtype=dtype,
                must_warn=MEAN_WARNING if r == "mean" else None,
                nan_allowed=maybe if r == "none" else np.asarray(maybe.any()),
            )
        return out

    def known_differences(self, api: Api, ex: Exact, compute: str) -> list[str]:
        found = []
        if np.any((ex.lp == -np.inf) & (ex.lq == -np.inf)):
            found.append("torch.masked_class_nan")
        if api.option("log_target") and np.any(ex.lp == -np.inf):
            found.append("torch.log_target_zero_target_nan")
        surely, maybe = underflow_meets_student_inf(ex, compute)
        if np.any(surely | maybe):
            found.append("torch.underflow_times_inf_nan")
        return found

    def adjust(self, expected: dict[str, Expectation]) -> tuple[dict[str, Expectation], bool]:
        """torch's 'batchmean' rounds the *sum* to the result dtype before dividing by size(0), so it
        overflows to inf with the sum (float16: past 65504) even when the mean is representable."""
        if "sum" not in expected or "batchmean" not in expected:
            return expected, False
        total = expected["sum"]
        surely, maybe = overflow_masks(total.value, total.tolerance, total.dtype)
        if not (surely.any() or maybe.any()):
            return expected, False
        bm = expected["batchmean"]
        with np.errstate(invalid="ignore"):
            value = np.where(surely, np.copysign(np.inf, np.asarray(total.value)), bm.value)
        allowed = maybe if bm.inf_allowed is None else (bm.inf_allowed | maybe)
        return {**expected, "batchmean": replace(bm, value=value, inf_allowed=allowed)}, True

    def warning(self, reduction: str) -> str | None:
        return MEAN_WARNING if self.resolve(reduction) == "mean" else None

    def reduces_own_output(self) -> bool:
        return True

    def reduce(self, pointwise: F64, reduction: str) -> F64:
        return torch_formula.torch_reduce(pointwise, reduction)

    def divisor(self, reduction: str, pointwise_shape: tuple[int, ...]) -> int:
        if reduction == "batchmean":
            return pointwise_shape[0]
        return super().divisor(reduction, pointwise_shape)

    def sum_rounded_first(self, reduction: str) -> bool:
        return reduction in ("sum", "batchmean")

    def grad_model(self, api: Api, ex: Exact, first: GradOutput, dtype: str, compute: str,
                   framework: str) -> GradModel:  # fmt: skip
        log_target = bool(api.option("log_target", False))
        tgt = ex.lp if log_target else ex.p
        g_s, g_t = torch_grads(tgt, ex.lq, ex.temperature, log_target=log_target)
        with np.errstate(invalid="ignore", over="ignore"):
            h = np.where(ex.p > 0, ex.lp + 1.0 - ex.lq, 0.0)
        bud = grad_budget(framework=framework, input_dtype=dtype, compute_dtype=compute,
                          temperature=ex.temperature, weight=ex.p, p=ex.p, q=ex.q, h=h, zt=ex.zt, zs=ex.zs,
                          log_p=ex.lp, log_q=ex.lq, student_is_probability=False)  # fmt: skip

        def pattern(out: GradOutput, scale: float) -> tuple[F64, F64]:
            s, t = torch_grads(out.seen_target, out.seen_input, ex.temperature, log_target=log_target, dtype=dtype)
            return scale * s, scale * t

        def differences(out: GradOutput) -> list[str]:
            found = []
            if log_target and np.any(out.seen_target == -np.inf):
                found.append("torch.log_target_grad_nan_at_neg_inf")
            if log_target and np.any(out.seen_input == -np.inf) and np.any(exp_in(out.seen_target, dtype) == 0):
                found.append("torch.log_target_grad_underflow_nan")
            if not log_target and np.any(out.seen_target == 0):
                found.append("torch.target_grad_nan_at_zero_target")
            return found

        return GradModel(g_s, g_t, *exact_grads(ex), bud, None, pattern, differences)

    def grad_divisor(self, reduction: str, shape: tuple[int, ...]) -> int:
        table = {"none": 1, "sum": 1, "mean": math.prod(shape), "batchmean": shape[0]}
        r = self.resolve(reduction)
        if r not in table:
            raise ValueError(f"unknown {self.semantics} reduction {reduction!r}")
        return table[r]

    def grad_difference_applies(self, api: Api, name: str, wrt: str) -> bool:
        """torch's gradient differences are all in d/d target: they explain no gap in d/d student."""
        return wrt == "teacher" or name not in self.grad_differences

    def golden_expected(self, g: Golden, ex: Exact, api: Api, fw: str, compute: str) -> GoldenExpected:
        """log q from log_softmax, the target p or log p; NaN on zero targets as documented."""
        return log_space_golden(g, ex, bool(api.option("log_target", False)), fw, compute)

    def golden_reductions(self, api: Api, shape: tuple[int, ...]) -> dict[str, tuple[Callable[[F64], F64] | None, int]]:
        """'none' summed over classes per row, and 'batchmean' (÷ input.size(0): C for 1-D input)."""
        return {"none": (lambda v: np.sum(v, axis=-1), 1), "batchmean": (None, shape[0])}

    def golden_gradient(self, g: Golden, ex: Exact) -> GoldenGradient | None:
        """Autograd of ``kl_div(log_softmax(s / T), softmax(t / T), reduction='sum')`` w.r.t. s."""
        import torch


        api = Api("torch", "torch.autograd.grad", "torch", ("sum",), (("of", "kl_div(reduction=sum)"),))
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
        tol = errormodel.golden_gradient(g.dtype, g.temperature, ex.p, ex.q, ex.lp, ex.lq, ex.zt, ex.zs)
        return GoldenGradient("torch", api.id + TAG, "d/d student", grad, tol, str(s.grad.dtype).removeprefix("torch."),
                              g.dtype)  # fmt: skip

    def scale_divisor(self, reduction: str, shape: tuple[int, ...]) -> tuple[str, int]:
        name = self.resolve(reduction)
        table = {"sum": 1, "mean": math.prod(shape), "batchmean": shape[0]}
        if name not in table:
            raise ValueError(f"reduction {reduction!r} is not checked at scale; expected one of {sorted(table)}")
        return name, table[name]
