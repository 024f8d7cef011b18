"""``paddle.nn.functional.kl_div``: pointwise ``label · (log label − input)`` with a zero for every
``label <= 0`` (or ``exp(label) · (label − input)`` with ``log_target=True``), reductions ``none`` /
``sum`` / ``mean`` (÷ every element, the default, without a warning) / ``batchmean`` (÷ shape[0], the
sum rounded first); the CPU (log_)softmax a distillation user feeds it, modelled as Paddle computes it;
its documented differences, facts (``facts``) and mutants (``mutants``).

Paddle 3.3's ``kldiv_loss`` kernel (phi, CPU and GPU) is ``log_target ? exp(t) * (t - x) :
(t <= 0 ? 0 : t * (log(t) - x))``; ``kl_div`` calls it with reduction 'none' and reduces in Python
with ``paddle.mean`` / ``paddle.sum(out) / input.shape[0]``. So where torch computes
``xlogy(t, t) - t * x``, Paddle gives exactly 0 for a zero (or negative) target whatever the input is:
0 * (-inf) and 0 * NaN are 0, not NaN.

The (log_)softmax stage is not the exact one either (phi's CPU softmax / log_softmax kernels, measured
on Paddle 3.3.1):

* both clip ``z - max z`` at -64 (``ValueClip``, kThreshold = -64) before ``exp``: a class whose
  shifted logit is below -64, or -inf (a masked class), gets probability e^-64 / S ≈ 1.6e-28 / S and
  log-probability -64 - log S, with S = sum_j exp(max(z_j - max z, -64)). Probabilities therefore never
  underflow and log-probabilities are never -inf: a student -inf where the teacher has mass gives a
  finite KL, where the exact one is +inf;
* float32 ``softmax`` on rows of at least 8 classes runs an AVX kernel: the row maximum is
  ``std::max_element`` (NaN only where the first class is NaN; other NaNs are skipped), the clip is
  ``_mm256_max_ps(x, -64)``, which turns NaN into -64, over the first ``n - n % 8`` classes, and a
  scalar ``x < -64 ? -64 : x`` (NaN kept) over the rest. A NaN logit inside the vector part becomes a
  probability of e^-64 / S instead of poisoning the row; one in the scalar tail (or NaN first with a
  tail) makes the row NaN. float64 softmax and every log_softmax propagate NaN to the row.

Sums (measured against simulated float32 sums): log_softmax adds exp over the classes one by one (its
log-sum-exp is 383 u off at 32000 float32 classes, 2663 u at 128000), softmax in 8 AVX lanes (float32) or
one by one (float64), ``paddle.mean`` ('mean', the default) in 8 lanes, ``paddle.sum`` in a tree:
``tolerances.SEQUENTIAL_SUMS`` holds ("paddle", float32 / float64). The engine's own-reduction check
assumes pairwise sums (log2 n roundings), so it flags 'mean' over many elements (pinned as
``paddle.float32_mean_accumulates_sequentially``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar, Final

import numpy as np
from numpy.typing import NDArray

from klparity.apis.base import ApiSpec, overflow_masks
from klparity.apis.torch_kl_div import formula as torch_formula
from klparity.model import Api, Expectation
from klparity.numerics.errormodel import Budget, budget

if TYPE_CHECKING:
    from klparity.model import Exact

F64 = NDArray[np.float64]
B = NDArray[np.bool_]

#: phi's ``ValueClip`` threshold: softmax / log_softmax compute exp(max(z - max z, CLIP))
CLIP: Final = -64.0
#: float32 lanes of the AVX softmax kernel (``AVX_FLOAT_BLOCK``); the last n % 8 classes run scalar code
AVX_FLOAT_BLOCK: Final = 8


def paddle_pointwise(input: F64, target: F64, *, log_target: bool = False, log_of_target: F64 | None = None) -> F64:
    """Paddle's ``kldiv_loss`` kernel, exactly, in float64.

    ``log_target=False``: ``target <= 0 ? 0 : target * (log(target) - input)`` (a NaN target is not
    ``<= 0``: NaN); ``log_of_target`` (optional) is log(target) known more accurately than the log of the
    rounded target. ``log_target=True``: ``exp(target) * (target - input)``, torch's formula (NaN where
    target = input = -inf).
    """
    x, y = np.asarray(input, np.float64), np.asarray(target, np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if log_target:
            return np.asarray(np.exp(y) * (y - x), np.float64)
        log_y = np.log(y) if log_of_target is None else np.asarray(log_of_target, np.float64)
        return np.asarray(np.where(y <= 0, 0.0, y * (log_y - x)), np.float64)


def _clipped_log_softmax(shifted: F64) -> F64:
    """log_softmax of shifted logits after Paddle's clip (NaN kept): y - log sum exp(y), y = max(shifted, CLIP)."""
    with np.errstate(invalid="ignore", over="ignore"):
        y = np.where(shifted < CLIP, CLIP, shifted)  # -inf -> CLIP; NaN < CLIP is False: NaN kept
        return np.asarray(y - np.log(np.sum(np.exp(y), axis=-1, keepdims=True)), np.float64)


def paddle_log_softmax(logits: F64, temperature: float) -> F64:
    """``F.log_softmax(logits / T)`` as Paddle's CPU kernel computes it, exactly in float64: the shift
    clipped at -64, a NaN anywhere makes the row NaN. Equal to ``oracle.log_softmax`` on rows without clipping."""
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.max(logits, axis=-1, keepdims=True)  # NaN propagates, as in Paddle's Eigen maximum
        m = np.where(np.isfinite(m), m, np.nan)
        return _clipped_log_softmax((logits - m) / temperature)


def _avx_softmax_shift(logits: F64, temperature: float) -> tuple[F64, B]:
    """(z - max z with the AVX kernel's NaN handling, per-row mask of NaNs it turned into CLIP)."""
    n = logits.shape[-1]
    with np.errstate(invalid="ignore", over="ignore"):
        first_nan = np.isnan(logits[..., :1])
        m = np.where(first_nan, np.nan, np.fmax.reduce(logits, axis=-1, keepdims=True))  # std::max_element
        shifted = (logits - m) / temperature
    vector_part = np.arange(n) < n - n % AVX_FLOAT_BLOCK
    swallowed = vector_part & np.isnan(shifted)
    return np.where(swallowed, CLIP, shifted), np.asarray(np.any(swallowed, axis=-1), np.bool_)


def avx_softmax(dtype: str, classes: int) -> bool:
    """Paddle's CPU softmax takes its AVX path (NaN-swallowing clip) for these rows."""
    return dtype == "float32" and classes >= AVX_FLOAT_BLOCK


def paddle_softmax(logits: F64, temperature: float, dtype: str) -> tuple[F64, F64, B]:
    """``F.softmax(logits / T)`` as Paddle's CPU kernel computes it in ``dtype``, exactly in float64:
    (probabilities, their logs, rows where a NaN logit was turned into a probability e^-64 / S)."""
    if avx_softmax(dtype, logits.shape[-1]):
        shifted, swallowed = _avx_softmax_shift(logits, temperature)
        log_p = _clipped_log_softmax(shifted)
    else:
        log_p = paddle_log_softmax(logits, temperature)
        swallowed = np.zeros(logits.shape[:-1], np.bool_)
    return np.exp(log_p), log_p, swallowed


def clipped(logits: F64, temperature: float) -> B:
    """Classes whose shifted logit (z - max z) Paddle clips at -64 (masked -inf classes included)."""
    with np.errstate(invalid="ignore"):
        m = np.fmax.reduce(logits, axis=-1, keepdims=True)
        return np.asarray((logits - m) / temperature < CLIP, np.bool_)


def _effective_logits(logits: F64, temperature: float) -> F64:
    """Logits / T as the clip leaves them (max z + clipped shift), for the error budget: a clipped class
    is exactly -64 after the shift, with no rounding error of its own logit."""
    with np.errstate(invalid="ignore", over="ignore"):
        z = logits / temperature
        m = np.fmax.reduce(z, axis=-1, keepdims=True)
        return np.asarray(np.where(z - m < CLIP, m + CLIP, z), np.float64)


class PaddleKlDiv(ApiSpec):
    """Paddle's ``kl_div``: see the module docstring."""

    semantics = "paddle_kl_div"
    default_reduction = "mean"
    none_is_elementwise = True
    facts = "klparity.apis.paddle_kl_div.facts"
    mutants = "klparity.apis.paddle_kl_div.mutants"
    differences: ClassVar[dict[str, str]] = {
        "paddle.softmax_clips_at_minus_64": "Paddle's CPU softmax and log_softmax clip z - max z at -64 before "
        "exp: a class below e^-64 of the row's largest (or masked with -inf) gets probability e^-64 / S instead "
        "of (nearly) 0, and log-probability about -64 instead of its own (or -inf). A student -inf where the "
        "teacher has mass gives a finite KL where the exact one is +inf; a wide spread of logits is compressed",
        "paddle.float32_softmax_swallows_nan": "Paddle's float32 CPU softmax (AVX kernel, rows of 8+ classes) "
        "clips with _mm256_max_ps, which turns a NaN logit in the first n - n % 8 classes into a probability "
        "e^-64 / S: the teacher row stays finite and the KL is finite where the exact one is NaN",
        "paddle.zero_target_swallows_nan": "the kernel returns exactly 0 where label <= 0 whatever the input: "
        "0 * (-inf) (a class masked on both sides) and a NaN input at a zero label give 0, not NaN "
        "(torch: NaN). Paddle's own softmax never returns a 0 label (it clips), a user's label can",
        "paddle.log_target_zero_target_nan": "with log_target=True the kernel computes exp(t) * (t - input) "
        "= 0 * (-inf - x) = NaN where the log-label is -inf, as torch; the exact KL gives 0. Paddle's own "
        "log_softmax never returns -inf (it clips), a user's log-label can",
    }

    def model(self, api: Api, ex: Exact, compute: str) -> tuple[F64, F64, F64, F64, B]:
        """What kl_div receives from Paddle's (log_)softmax, exactly: (log q, p, log p, the target as
        passed, rows where a NaN teacher logit was swallowed)."""
        lq = paddle_log_softmax(ex.student, ex.temperature)
        if api.option("log_target", False):
            lp = paddle_log_softmax(ex.teacher, ex.temperature)
            return lq, np.exp(lp), lp, lp, np.zeros(lp.shape[:-1], np.bool_)
        p, lp, swallowed = paddle_softmax(ex.teacher, ex.temperature, compute)
        return lq, p, lp, p, swallowed

    def expectations(self, api: Api, ex: Exact, dtype: str, compute: str,
                     framework: str) -> tuple[dict[str, Expectation], Budget]:  # fmt: skip
        log_target = bool(api.option("log_target", False))
        lq, p, lp, target, swallowed = self.model(api, ex, compute)
        bud = budget(framework=framework, input_dtype=dtype, compute_dtype=compute, p=p, q=np.exp(lq),
                     zt=_effective_logits(ex.teacher, ex.temperature),
                     zs=_effective_logits(ex.student, ex.temperature),
                     student_is_probability=False, log_p=lp, log_q=lq)  # fmt: skip
        pointwise = paddle_pointwise(lq, target, log_target=log_target, log_of_target=None if log_target else lp)
        with np.errstate(invalid="ignore"):
            exact_pointwise = np.where(ex.p == 0, 0.0, ex.p * (ex.lp - ex.lq))
        exact_pointwise = np.where(np.isnan(ex.rows)[..., None], np.nan, exact_pointwise)
        # a CPU without the AVX kernel propagates the NaN: accepted too
        nan_rows = np.broadcast_to(swallowed[..., None], pointwise.shape)
        total = float(np.sum(ex.rows))
        out = {}
        for red in api.reductions:
            r = self.resolve(red)
            divisor = self.divisor(r, pointwise.shape)
            out[red] = Expectation(
                value=torch_formula.torch_reduce(pointwise, r),
                tolerance=bud.elementwise() if r == "none" else bud.total() / divisor,
                exact=np.asarray(exact_pointwise) if r == "none" else np.asarray(total / divisor),
                gap_bound=None,
                dtype=compute,
                must_warn=None,
                nan_allowed=np.asarray(nan_rows) if r == "none" else np.asarray(swallowed.any()),
            )
        return out, bud

    def known_differences(self, api: Api, ex: Exact, compute: str) -> list[str]:
        found = []
        if np.any(clipped(ex.teacher, ex.temperature) | clipped(ex.student, ex.temperature)):
            found.append("paddle.softmax_clips_at_minus_64")
        lq, _, _, target, swallowed = self.model(api, ex, compute)
        if swallowed.any():
            found.append("paddle.float32_softmax_swallows_nan")
        if api.option("log_target", False):
            if np.any(target == -np.inf):
                found.append("paddle.log_target_zero_target_nan")
        elif np.any((target <= 0) & np.isnan(lq)):  # the exact term is 0 at -inf, NaN at NaN
            found.append("paddle.zero_target_swallows_nan")
        return found

    def adjust(self, expected: dict[str, Expectation]) -> tuple[dict[str, Expectation], bool]:
        """'batchmean' is ``paddle.sum(out) / input.shape[0]``: the sum is rounded to the result dtype
        before the division, so it overflows to inf with the sum even where the mean would fit."""
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

    def reduces_own_output(self) -> bool:
        return True

    def reduce(self, pointwise: F64, reduction: str) -> F64:
        return torch_formula.torch_reduce(pointwise, reduction)

    def divisor(self, reduction: str, pointwise_shape: tuple[int, ...]) -> int:
        if reduction == "batchmean":
            return pointwise_shape[0]
        return 1 if reduction in ("sum", "none") else math.prod(pointwise_shape)

    def sum_rounded_first(self, reduction: str) -> bool:
        """``paddle.sum`` (then ÷ shape[0] for 'batchmean') and ``paddle.mean`` (an Eigen mean reducer
        accumulating in the tensor's dtype) both hold the sum in the result dtype before dividing."""
        return reduction in ("sum", "mean", "batchmean")
