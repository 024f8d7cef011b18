"""``optax.losses.kl_divergence``, ``optax.losses.kl_divergence_with_log_targets`` and
``sum(jax.scipy.special.rel_entr(p, q), -1)``: per-row values, the caller reduces (the single reduction
``'none'``). The optax losses are torch's two pointwise formulas in exact arithmetic, special values
included; ``rel_entr`` takes probabilities, so underflow makes +inf where the exact KL is finite.
Documented differences with their predicates (which depend on XLA:CPU flushing subnormals).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
from numpy.typing import NDArray

from klparity.apis.base import ApiSpec, log_space_golden, rel_entr_masks, underflow_meets_student_inf
from klparity.apis.torch_kl_div import formula as torch_formula
from klparity.frameworks.jax_adapter import KL as OPTAX_KL
from klparity.frameworks.jax_adapter import KL_LOG_TARGETS as OPTAX_KL_LOG_TARGETS
from klparity.frameworks.jax_adapter import REL_ENTR as JAX_REL_ENTR
from klparity.model import Api, Expectation, GoldenExpected
from klparity.numerics import oracle
from klparity.numerics.dtypes import dtype_info, round_to, widen
from klparity.numerics.errormodel import Budget, budget

if TYPE_CHECKING:
    from klparity.model import Exact
    from klparity.numerics.goldens import Golden

F64 = NDArray[np.float64]

# optax.losses.kl_divergence is p * (where(p == 0, 0, log p) - log q) and ..._with_log_targets is
# exp(lp) * (lp - log q), summed over the last axis (optax 0.2.8, optax/losses/_classification.py).
# In exact arithmetic, special values included (0 * -inf = NaN on a masked class, +inf where only the
# student is -inf), these are torch's two pointwise formulas, so torch_formula.torch_pointwise models them
# (tests/unit/test_jax_adapter.py runs optax in float64 against it on special values).


def xla_flushes(dtype: str) -> bool:
    """XLA:CPU flushes float32, bfloat16 and float64 subnormals to zero, not float16 (computed in float32)."""
    return dtype != "float16"


def rel_entr_inf_rows(
    ex: Exact, framework: str, dtype: str
) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Rows where ``sum(jax.scipy.special.rel_entr(p, q), -1)`` is +inf in ``dtype``: (surely, possibly).

    JAX computes p and q = softmax(z) as exp(z - max z) / sum in ``dtype``; rel_entr is +inf where
    q_j = 0 < p_j, and for NaN arguments. A probability is surely 0 where its logit is -inf or where
    exp(z_j - max z) is below half the smallest subnormal even after the softmax stage's error (it rounds
    to 0 under any rounding or flushing, and division keeps it 0); surely nonzero where it exceeds the
    smallest normal after that error (some backends flush subnormals: XLA:CPU does for float32, float64
    and bfloat16, not for float16, which it computes in float32). In between the backend and rounding
    decide. The error of log p_j is the tolerance model's softmax-stage term, c_in u (|z_j| + max|z| +
    log2 C + 1), with c_in from the (framework, dtype) row.
    """
    return rel_entr_rows(rel_entr_masks(ex, framework, dtype))


def rel_entr_rows(m: dict[str, NDArray[np.bool_]]) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """``rel_entr_inf_rows`` from the masks of ``rel_entr_masks``."""
    surely = np.any(m["q_zero"] & m["p_kept"], axis=-1) | m["nan_rows"]
    possibly = surely | np.any(~m["q_kept"] & ~m["p_zero"], axis=-1)
    return surely, possibly


class OptaxKl(ApiSpec):
    """optax's two KL losses and JAX's ``rel_entr``, per row: see the module docstring."""

    semantics = "optax"
    conventions = "klparity.apis.optax_kl.conventions"
    differences: ClassVar[dict[str, str]] = {
        "optax.masked_class_nan": "optax.losses.kl_divergence computes targets * (where(targets == 0, 0, "
        "log(targets)) - log_predictions) = 0 * (0 - (-inf)) = NaN on a class masked with -inf in both "
        "teacher and student; the exact KL gives 0 for that class",
        "optax.log_targets_zero_target_nan": "optax.losses.kl_divergence_with_log_targets computes "
        "exp(log_targets) * (log_targets - log_predictions) = 0 * (-inf - x) = NaN where the log-target is "
        "-inf; the exact KL gives 0",
        "jax.rel_entr_nan_is_inf": "jax.scipy.special.rel_entr(p, q) is +inf, not NaN, where p or q is NaN "
        "(neither its p > 0 nor its p == 0 branch holds; SciPy's rel_entr gives NaN): a row with a NaN logit "
        "sums to +inf where the exact KL is NaN",
        "optax.underflow_times_inf_nan": "a teacher probability that underflows to 0 in the tested dtype, "
        "on a class where the student is -inf, gives 0 * inf = NaN in both optax losses (as in torch); the "
        "exact KL is +inf",
        "jax.rel_entr_underflow_hides_inf": "a teacher probability that underflows to 0 in the compute dtype, "
        "on a class where the student is -inf, makes that term rel_entr(0, 0) = 0: the row is finite where "
        "the exact KL is +inf",
        "jax.rel_entr_underflow_inf": "rel_entr takes probabilities: where the student's softmax underflows "
        "to 0 in the compute dtype (below half its smallest subnormal, or below its smallest normal where the "
        "backend flushes subnormals, as XLA:CPU does) and the teacher's does not, the term is +inf although "
        "log q is finite and so is the exact KL; the log-space optax losses do not have this",
    }

    def expectations(self, api: Api, ex: Exact, dtype: str, compute: str,
                     framework: str) -> tuple[dict[str, Expectation], Budget]:  # fmt: skip
        return _optax_expectations(api, ex, compute, framework)

    def known_differences(self, api: Api, ex: Exact, compute: str) -> list[str]:
        return _optax_differences(api, ex, compute)

    def golden_expected(self, g: Golden, ex: Exact, api: Api, fw: str, compute: str) -> GoldenExpected:
        """optax's losses as torch's log-space formulas; rel_entr on probabilities (underflow to +inf)."""
        if api.entry == JAX_REL_ENTR:
            return _rel_entr_golden(g, ex, fw, compute)
        return log_space_golden(g, ex, api.entry == OPTAX_KL_LOG_TARGETS, fw, compute)


def _rel_entr_golden(g: Golden, ex: Exact, fw: str, compute: str) -> GoldenExpected:
    """sum(rel_entr(p, q)) on probabilities: +inf where q_j underflows to 0 in the dtype but p_j does
    not, either +inf or the golden where q_j is subnormal there (flush-to-zero decides), and +inf
    (not NaN) on a NaN row: JAX's rel_entr has no NaN branch."""
    p_c, q_c = widen(round_to(ex.p, compute)), widen(round_to(ex.q, compute))
    nan_rows = np.isnan(g.kl)
    inf_rows = ((p_c > 0) & (q_c == 0)).any(axis=-1) & ~nan_rows
    either = ((p_c > 0) & (q_c < dtype_info(compute).smallest_normal)).any(axis=-1) & ~nan_rows & ~inf_rows
    rows = np.where(inf_rows | nan_rows, np.inf, g.kl)
    bud = budget(framework=fw, input_dtype=g.dtype, compute_dtype=compute, p=ex.p, q=ex.q,
                            zt=ex.zt, zs=ex.zs, student_is_probability=True, log_p=ex.lp, log_q=ex.lq)  # fmt: skip
    notes = []
    if inf_rows.any() or either.any():
        notes.append(f"jax.rel_entr_underflow_inf: {int(inf_rows.sum())} rows +inf where q underflows {compute} "
                     f"and p does not, {int(either.sum())} rows +inf or exact (subnormal q)")  # fmt: skip
    if nan_rows.any():
        notes.append(f"jax.rel_entr_nan_is_inf: {int(nan_rows.sum())} NaN rows come out +inf")
    return GoldenExpected(rows, bud.rows(), float(np.sum(rows)), bud.total(), notes, either_inf=either)


def _optax_expectations(
    api: Api, ex: Exact, dtype: str, framework: str
) -> tuple[dict[str, Expectation], Budget]:
    """Per-row value of the optax losses / summed rel_entr (the single reduction ``'none'``)."""
    rel_entr = api.entry == JAX_REL_ENTR
    bud = budget(framework=framework, input_dtype=dtype, compute_dtype=dtype, p=ex.p, q=ex.q, zt=ex.zt,
                 zs=ex.zs, student_is_probability=rel_entr, log_p=ex.lp, log_q=ex.lq)  # fmt: skip
    inf_allowed = nan_allowed = None
    if api.entry in (OPTAX_KL, OPTAX_KL_LOG_TARGETS):
        # teacher mass that underflows to 0 where the student is -inf: 0 * inf = NaN, as in torch
        flushed, maybe = underflow_meets_student_inf(ex, dtype, flushes=xla_flushes(dtype))
        if api.entry == OPTAX_KL:
            pointwise = torch_formula.torch_pointwise(ex.lq, np.where(flushed, 0.0, ex.p), log_target=False)
        else:
            pointwise = torch_formula.torch_pointwise(ex.lq, np.where(flushed, -np.inf, ex.lp), log_target=True)
        value = np.sum(pointwise, axis=-1)
        nan_allowed = np.asarray(maybe.any(axis=-1))
    elif rel_entr:
        masks = rel_entr_masks(ex, framework, dtype)
        surely, possibly = rel_entr_rows(masks)
        # where the student is -inf, teacher mass that is not surely kept may be 0: rel_entr(0, 0) = 0
        # there (the value below; +inf is allowed too, through ``possibly``)
        dropped = (ex.lq == -np.inf) & ~masks["p_kept"]
        value = np.where(surely, np.inf, oracle.kl_from_log_probs(np.where(dropped, -np.inf, ex.lp), ex.lq))
        inf_allowed = possibly & ~surely
    else:
        raise ValueError(f"no optax-semantics formula for {api.entry!r}")
    exp = Expectation(value=np.asarray(value, np.float64), tolerance=bud.rows(), exact=ex.rows,
                      gap_bound=None, dtype=dtype, must_warn=None, inf_allowed=inf_allowed,
                      nan_allowed=nan_allowed)  # fmt: skip
    return {red: exp for red in api.reductions}, bud


def _optax_differences(api: Api, ex: Exact, compute: str) -> list[str]:
    """Documented differences of the optax / JAX per-row APIs whose condition holds here."""
    found = []
    if api.entry == OPTAX_KL and np.any((ex.lp == -np.inf) & (ex.lq == -np.inf)):
        found.append("optax.masked_class_nan")
    if api.entry == OPTAX_KL_LOG_TARGETS and np.any(ex.lp == -np.inf):
        found.append("optax.log_targets_zero_target_nan")
    if api.entry in (OPTAX_KL, OPTAX_KL_LOG_TARGETS):
        surely, maybe = underflow_meets_student_inf(ex, compute, flushes=xla_flushes(compute))
        if np.any(surely | maybe):
            found.append("optax.underflow_times_inf_nan")
    if api.entry == JAX_REL_ENTR:
        masks = rel_entr_masks(ex, api.framework, compute)
        if np.any((ex.lq == -np.inf) & (ex.p > 0) & ~masks["p_kept"]):
            found.append("jax.rel_entr_underflow_hides_inf")
        nan_rows = masks["nan_rows"]
        if np.any(nan_rows):
            found.append("jax.rel_entr_nan_is_inf")
        if np.any(rel_entr_rows(masks)[1] & ~nan_rows):
            found.append("jax.rel_entr_underflow_inf")
    return found
