"""``torch.distributions.kl_divergence(Categorical(...), Categorical(...))``: KL(first ‖ second) per row of
the batch shape, no reduction, no temperature (the caller divides the logits by T). Computed as
``p.probs * (p.logits - q.logits)`` with the term set to +inf where ``q.probs == 0`` and then to 0 where
``p.probs == 0``, the probabilities in the tested dtype: a student probability that underflows gives +inf,
a teacher probability that underflows hides a -inf student. From ``probs=``, its logits are
``log(clamp(probs, eps, 1 - eps))`` (eps of the dtype). A NaN logit raises in the constructor by default
(``validate_args``): the cells build without validation, the pinned facts (``facts``) pin the default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
from numpy.typing import NDArray

from klparity.apis.base import ApiSpec, probability_space_differences, probability_space_rows, rel_entr_masks
from klparity.model import Api, Expectation
from klparity.numerics.dtypes import dtype_info
from klparity.numerics.errormodel import Budget, budget

if TYPE_CHECKING:
    from klparity.model import Exact

F64 = NDArray[np.float64]

ENTRY = "torch.distributions.kl_divergence"


class TorchDistributionsKl(ApiSpec):
    """``kl_divergence`` of two ``Categorical`` (from logits or from probs): see the module docstring."""

    semantics = "torch_distributions"
    facts = "klparity.apis.torch_distributions.facts"
    mutants = "klparity.apis.torch_distributions.mutants"
    differences: ClassVar[dict[str, str]] = {
        "torch.distributions.student_underflow_inf": "kl_divergence(Categorical, Categorical) sets a term to +inf "
        "where the student's probability is 0 in the tested dtype: where softmax(s/T) underflows (its logit is "
        "finite) the row is +inf although the exact KL is finite",
        "torch.distributions.teacher_underflow_hides_inf": "the term is set to 0 where the teacher's probability "
        "is 0 in the tested dtype, after the +inf of a zero student probability: where the teacher's mass "
        "underflows on a class the student masks (-inf), the row is finite where the exact KL is +inf",
        "torch.distributions.probs_clamped": "Categorical(probs=...) takes logits = log(clamp(probs, eps, 1 - "
        "eps)), eps the dtype's machine epsilon: a probability below eps counts as eps (and one above 1 - eps "
        "as 1 - eps), so the value differs from the exact KL where the student puts less than eps on a class",
    }

    def expectations(self, api: Api, ex: Exact, dtype: str, compute: str,
                     framework: str) -> tuple[dict[str, Expectation], Budget]:  # fmt: skip
        from_probs = api.option("from") == "probs"
        bud = budget(framework=framework, input_dtype=dtype, compute_dtype=compute, p=ex.p, q=ex.q, zt=ex.zt,
                     zs=ex.zs, student_is_probability=from_probs, log_p=ex.lp, log_q=ex.lq)  # fmt: skip
        value, inf_allowed = probability_space_rows(ex, framework, compute)
        if from_probs:  # the same masks; the logs of the clamped probabilities where neither is 0
            eps = 2.0 * dtype_info(compute).unit_roundoff  # torch.finfo(dtype).eps
            with np.errstate(divide="ignore", invalid="ignore"):
                lpc = np.log(np.clip(ex.p, eps, 1.0 - eps))
                lqc = np.log(np.clip(ex.q, eps, 1.0 - eps))
                clamped = np.sum(np.where(ex.p > 0, ex.p * (lpc - lqc), 0.0), axis=-1)
            masks = rel_entr_masks(ex, framework, compute)
            keep = np.isfinite(value) & ~masks["nan_rows"]
            value = np.where(keep, np.where(np.isnan(clamped), value, clamped), value)
        exp = Expectation(value=np.asarray(value, np.float64), tolerance=bud.rows(), exact=ex.rows,
                          gap_bound=None, dtype=compute, must_warn=None, inf_allowed=inf_allowed)  # fmt: skip
        return {red: exp for red in api.reductions}, bud

    def known_differences(self, api: Api, ex: Exact, compute: str) -> list[str]:
        found = probability_space_differences(ex, api.framework, compute, "torch.distributions")
        eps = 2.0 * dtype_info(compute).unit_roundoff
        if api.option("from") == "probs" and np.any(np.isfinite(ex.lp) & ((ex.p < eps) | (ex.p > 1 - eps)) |
                                                      np.isfinite(ex.lq) & ((ex.q < eps) | (ex.q > 1 - eps))):
            found.append("torch.distributions.probs_clamped")
        return found


