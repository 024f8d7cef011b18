"""The contract of an API spec: everything the engine needs to know about one KL API, in one place.

A spec (one per ``Api.semantics``) holds the API's pointwise formula and reductions evaluated exactly
(``expectations``), its documented differences from the exact KL with the predicates that say where
they apply (``differences``, ``known_differences``), its result-range quirks (``adjust``), the warning
it must raise, how it reduces its own unreduced output (reduction consistency), its hand-derived
gradient (``grad_model``, ``grad_scale``), and the modules that hold its pinned facts and its
mutants. Its tolerance rows stay in ``klparity.numerics.errormodel.TABLE``, keyed by framework and dtype. The
engine (``checks``, ``gradients``, ``scale``) asks the spec and names no framework or API itself.
Adding an API: one spec module, one line in ``klparity.apis.SPECS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from klparity.model import Api, Expectation, GoldenExpected, GoldenGradient, GradOutput
from klparity.numerics import oracle
from klparity.numerics.dtypes import dtype_info
from klparity.numerics.errormodel import Budget, GradBudget, budget, table_row

if TYPE_CHECKING:
    from klparity.model import Exact
    from klparity.numerics.goldens import Golden

F64 = NDArray[np.float64]


@dataclass(frozen=True)
class GradModel:
    """What one cell's gradients must be: values at scale 1 and the pattern for a given output."""

    student: F64  #: formula value from the exact probabilities, scale 1
    teacher: F64
    exact_student: F64  #: exact gradient, scale 1
    exact_teacher: F64
    budget: GradBudget
    gap_bound: F64 | None  #: bound on |formula - exact| of d/ds (Keras), scale 1
    pattern: Callable[[GradOutput, float], tuple[F64, F64]]  #: formula on the seen values
    differences: Callable[[GradOutput], list[str]]


def rounding_band(ex: Exact, dtype: str) -> F64:
    """Relative error of a probability computed in ``dtype`` (the softmax stage of the error model)."""
    u = dtype_info(dtype).unit_roundoff
    with np.errstate(invalid="ignore"):
        mt = np.max(np.where(np.isfinite(ex.zt), np.abs(ex.zt), 0.0), axis=-1, keepdims=True)
        rho = np.where(np.isfinite(ex.zt), np.abs(ex.zt), 0.0) + mt + math.log2(max(ex.p.shape[-1], 2)) + 1.0
    return np.asarray(np.minimum(0.5, 4.0 * u * rho), np.float64)


def underflow_meets_student_inf(
    ex: Exact, dtype: str, flushes: bool = False
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Classes where the student is -inf and the teacher's mass underflows to 0 in ``dtype``.

    There torch (and optax) compute 0 * inf = NaN where the exact KL is +inf. Returns (surely, maybe):
    the probability is below half the smallest subnormal even after its rounding error, or near it
    (up to the smallest normal number when the backend ``flushes`` subnormals to zero).
    """
    info = dtype_info(dtype)
    half = 0.5 * info.smallest_subnormal
    top = info.smallest_normal if flushes else half
    band = rounding_band(ex, dtype)
    student_inf = (ex.lq == -np.inf) & (ex.p > 0)
    surely = student_inf & (ex.p * (1.0 + band) < half)
    maybe = student_inf & ~surely & (ex.p * (1.0 - band) <= top)
    return surely, maybe


def overflow_masks(value: F64, tol: F64 | float, dtype: str) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """(surely, maybe): |value| beyond the dtype's rounding boundary to inf, beyond any doubt or within ``tol``."""
    info = dtype_info(dtype)
    boundary = info.max * (1.0 + info.unit_roundoff)
    value = np.asarray(value, np.float64)
    tol_a = np.broadcast_to(np.asarray(tol, np.float64), value.shape)
    with np.errstate(invalid="ignore"):
        surely = np.isfinite(value) & (np.abs(value) - tol_a >= boundary)
        maybe = np.isfinite(value) & ~surely & (np.abs(value) + tol_a >= boundary)
    return surely, maybe


def with_nan_rows(g: Golden, nan_rows: NDArray[np.bool_]) -> tuple[F64, float]:
    rows = np.where(nan_rows, np.nan, g.kl)
    return rows, (math.nan if nan_rows.any() else g.kl_sum)


def log_space_golden(g: Golden, ex: Exact, log_target: bool, fw: str, compute: str) -> GoldenExpected:
    """torch and optax: log q from log_softmax, the target p or log p; NaN quirks on zero targets."""
    zero_p = ex.lp == -np.inf
    quirk = zero_p if log_target else zero_p & (ex.lq == -np.inf)
    nan_rows = quirk.any(axis=-1)
    rows, total = with_nan_rows(g, nan_rows)
    bud = budget(framework=fw, input_dtype=g.dtype, compute_dtype=compute, p=ex.p, q=ex.q,
                            zt=ex.zt, zs=ex.zs, student_is_probability=False, log_p=ex.lp,
                            log_q=ex.lq)  # fmt: skip
    where = "zero targets" if log_target else "classes masked on both sides"
    notes = [f"{int(nan_rows.sum())} rows NaN by the documented 0 * -inf on {where}"] if nan_rows.any() else []
    return GoldenExpected(rows, bud.rows(), total, bud.total(), notes)


def rel_entr_masks(ex: Exact, framework: str, dtype: str) -> dict[str, NDArray[np.bool_]]:
    """Per class: p or q surely 0 (``p_zero``, ``q_zero``) or surely nonzero (``p_kept``, ``q_kept``)
    in ``dtype``, as ``rel_entr_inf_rows`` describes; ``nan_rows`` per row."""
    info, row = dtype_info(dtype), table_row(framework, dtype)
    log2c = math.log2(max(ex.p.shape[-1], 2))
    log_half_eta = math.log(info.smallest_subnormal) - math.log(2.0)
    log_normal = math.log(info.smallest_normal)

    def zero_and_kept(z: F64, logp: F64) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
        with np.errstate(invalid="ignore"):
            fin = np.isfinite(z)
            m = np.max(np.where(fin, np.abs(z), 0.0), axis=-1, keepdims=True)
            err = row.c_in * info.unit_roundoff * (np.where(fin, np.abs(z), 0.0) + m + log2c + 1.0)
            unnormalised = logp - np.max(logp, axis=-1, keepdims=True)  # log exp(z_j - max z)
            zero = (logp == -np.inf) | (unnormalised + err < log_half_eta)
            kept = np.isfinite(logp) & (logp - err > log_normal)
        return zero, kept

    p_zero, p_kept = zero_and_kept(ex.zt, ex.lp)
    q_zero, q_kept = zero_and_kept(ex.zs, ex.lq)
    nan_rows = np.asarray(np.isnan(ex.lp).any(axis=-1) | np.isnan(ex.lq).any(axis=-1), dtype=np.bool_)
    return {"p_zero": p_zero, "p_kept": p_kept, "q_zero": q_zero, "q_kept": q_kept, "nan_rows": nan_rows}


def probability_space_rows(ex: Exact, framework: str, dtype: str) -> tuple[F64, NDArray[np.bool_]]:
    """Per-row value of a KL evaluated on probabilities rounded to ``dtype`` with NaN propagating: +inf
    where the student's probability surely underflows to 0 under teacher mass, the term dropped where the
    teacher's underflows (0 · anything = 0, even against a -inf student), the exact KL elsewhere; and the
    rows where +inf is accepted too (an underflow within rounding error). The model of ``rel_entr_masks``.
    """
    masks = rel_entr_masks(ex, framework, dtype)
    surely = np.any(masks["q_zero"] & masks["p_kept"], axis=-1)
    possibly = surely | np.any(~masks["q_kept"] & ~masks["p_zero"], axis=-1)
    dropped = (ex.lq == -np.inf) & ~masks["p_kept"]
    value = np.where(surely, np.inf, oracle.kl_from_log_probs(np.where(dropped, -np.inf, ex.lp), ex.lq))
    return np.asarray(value, np.float64), np.asarray(possibly & ~surely & ~masks["nan_rows"])


def probability_space_differences(ex: Exact, framework: str, dtype: str, prefix: str) -> list[str]:
    """``<prefix>.student_underflow_inf`` / ``<prefix>.teacher_underflow_hides_inf`` where they can apply."""
    masks = rel_entr_masks(ex, framework, dtype)
    found = []
    finite_q = np.isfinite(ex.lq)
    if np.any(~masks["q_kept"] & ~masks["p_zero"] & finite_q & ~masks["nan_rows"][..., None]):
        found.append(f"{prefix}.student_underflow_inf")
    if np.any((ex.lq == -np.inf) & (ex.p > 0) & ~masks["p_kept"]):
        found.append(f"{prefix}.teacher_underflow_hides_inf")
    return found


@dataclass(frozen=True)
class GapFigure:
    """A figure of the report for an API whose formula departs from the exact KL: its batch value against
    the exact one as the temperature varies (drawn when ``framework`` is among the selected ones)."""

    name: str  #: the figure's file suffix
    framework: str
    caption: str
    label: str  #: the API's curve in the legend, e.g. "clipped"
    title_values: str
    title_gap: str
    gap_label: str  #: the y label of the relative gap
    #: the API's batch value from float64 p and q (as the API sees them), or None where it equals the exact
    value: Callable[[F64, F64], float | None]


class ApiSpec:
    """One KL API's semantics (see the module docstring); the defaults fit an API without them.

    ``semantics``: the ``Api.semantics`` key; ``differences`` / ``grad_differences``: documented
    differences from the exact KL and its gradient (name -> what and why); ``facts`` / ``mutants``:
    modules registering its pinned facts and its mutants when imported.
    """

    semantics: ClassVar[str]
    differences: ClassVar[dict[str, str]] = {}
    grad_differences: ClassVar[dict[str, str]] = {}
    facts: ClassVar[str | None] = None
    mutants: ClassVar[str | None] = None
    #: module holding how ``klparity check`` speaks of the API (its reductions, wording, formulas by role);
    #: read from the class that declares it, so a subclass does not repeat it
    conventions: ClassVar[str | None] = None
    #: its ``'none'`` reduction returns one value per class (pointwise), not one per row
    none_is_elementwise: ClassVar[bool] = False
    #: the reduction label ``'default'`` stands for
    default_reduction: ClassVar[str] = "none"
    #: the report's figure of how far the API's formula is from the exact KL, where it departs from it;
    #: read from the class that declares it (``own``), so a subclass does not draw it again
    gap_figure: ClassVar[GapFigure | None] = None
    #: entry points whose gradient cells run in the full tier only
    full_tier_only_grad_entries: ClassVar[tuple[str, ...]] = ()

    def own(self, name: str) -> Any:
        """The class attribute ``name`` where this record's class declares it itself, else None (what a
        subclass inherits, such as its parent's ``conventions`` or ``gap_figure``, is its parent's to give)."""
        return type(self).__dict__.get(name)

    def entries(self, framework: str, dtype: str) -> tuple[Api, ...]:
        """The APIs this record declares and calls itself (``Api.call``) on ``framework`` for ``dtype``; the
        adapter lists the ones it calls (``Adapter.apis``)."""
        return ()

    def expectations(self, api: Api, ex: Exact, dtype: str, compute: str,
                     framework: str) -> tuple[dict[str, Expectation], Budget]:  # fmt: skip
        """Per reduction of ``api``: what it must return for the case ``ex`` (inputs rounded to ``dtype``,
        computed in ``compute``), how close, and the exact KL reduced the same way; and the error budget."""
        raise NotImplementedError

    def expectations_shared(
        self, api: Api, ex: Exact, dtype: str, compute: str, framework: str, shared: dict[tuple[object, ...], Budget]
    ) -> tuple[dict[str, Expectation], Budget]:
        """``expectations``, where APIs of one spec may share work through ``shared`` (the scale tier's
        row blocks: one budget for several variants of an API)."""
        return self.expectations(api, ex, dtype, compute, framework)

    def known_differences(self, api: Api, ex: Exact, compute: str) -> list[str]:
        """The documented differences whose condition holds for this case and API."""
        return []

    def adjust(self, expected: dict[str, Expectation]) -> tuple[dict[str, Expectation], bool]:
        """API-specific result-range behaviour (e.g. a sum rounded before dividing); True when it applied."""
        return expected, False

    def warning(self, reduction: str) -> str | None:
        """Text of the warning the API must raise for ``reduction`` (None: it must raise none)."""
        return None

    # ---------------------------------------------------------------- reduction consistency

    def reduces_own_output(self) -> bool:
        """Its reductions are checked against its own unreduced (``'none'``) output."""
        return False

    def reduce(self, pointwise: F64, reduction: str) -> F64:
        """The API's reduction of its own unreduced output, exactly (``reduction`` already resolved)."""
        raise NotImplementedError

    def divisor(self, reduction: str, pointwise_shape: tuple[int, ...]) -> int:
        """What ``reduce`` divides the sum of its unreduced output by."""
        return 1 if reduction == "sum" else math.prod(pointwise_shape)

    def sum_rounded_first(self, reduction: str) -> bool:
        """The reduction rounds the sum to the result dtype before dividing (it overflows with the sum)."""
        return False

    def resolve(self, reduction: str) -> str:
        """The reduction a label means (``'default'`` -> ``default_reduction``)."""
        return self.default_reduction if reduction == "default" else reduction

    # ---------------------------------------------------------------------------- gradients

    def has_gradients(self, api: Api | None = None) -> bool:
        """``grad_model`` is implemented (for ``api``, when given: a spec may model some variants only)."""
        return type(self).grad_model is not ApiSpec.grad_model

    def grad_model(self, api: Api, ex: Exact, first: GradOutput, dtype: str, compute: str,
                   framework: str) -> GradModel:  # fmt: skip
        """What the API's gradients must be for the case ``ex`` (``first``: one reduction's output, for the
        values the API saw)."""
        raise NotImplementedError

    def grad_divisor(self, reduction: str, shape: tuple[int, ...]) -> int:
        """What a reduction divides the gradient of the summed loss by, on logits of ``shape``."""
        raise NotImplementedError

    def grad_scale(self, reduction: str, shape: tuple[int, ...]) -> float:
        """Factor a reduction applies to the gradient of the summed loss ('none' differentiates the sum)."""
        return 1.0 / self.grad_divisor(reduction, shape)

    def grad_difference_applies(self, api: Api, name: str, wrt: str) -> bool:
        """The documented gradient difference ``name`` can explain a gap in d/d``wrt`` of ``api``."""
        return True

    # --------------------------------------------------------------------------------- goldens

    def has_goldens(self) -> bool:
        """``golden_expected`` is implemented (the golden cells judge only such APIs)."""
        return type(self).golden_expected is not ApiSpec.golden_expected

    def golden_expected(self, g: Golden, ex: Exact, api: Api, fw: str, compute: str) -> GoldenExpected:
        """What ``api`` must return per row and in total on the golden ``g`` (mpmath reference rows)."""
        raise NotImplementedError(f"no golden expectations for API semantics {self.semantics!r}")

    def golden_reductions(self, api: Api, shape: tuple[int, ...]) -> dict[str, tuple[Callable[[F64], F64] | None, int]]:
        """Reduction label -> (how its output becomes per-row values, or None for a batch scalar; the
        divisor of the expected total for that scalar). By default ``'none'``, one value per row."""
        return {"none": (lambda v: v, 1)}

    def golden_gradient(self, g: Golden, ex: Exact) -> GoldenGradient | None:
        """The API's gradient on the golden, on the CPU, for the engine to judge; None if not checked."""
        return None

    # ------------------------------------------------------------------------------ scale tier

    def scale_divisor(self, reduction: str, shape: tuple[int, ...]) -> tuple[str, int]:
        """(reduction name, divisor) of a reduction label on the total over ``shape`` (scale tier)."""
        raise ValueError(f"no scale reference for {self.semantics!r} semantics")
