"""Keras 3's ``keras.distillation.LogitsDistillation(temperature, loss).compute_loss(teacher, student)``: both
logits divided by T, then, for a ``KLDivergence`` *object* (``loss="KLDivergence"``), softmax and T² · the
Keras KL averaged over rows (B·S for (B, S, C)), computed in float32 (the Loss object's dtype); for the
default ``loss="kl_divergence"``, a string that resolves to the plain *function*, the scaled logits go
straight into ``kl_divergence``: clipped to [1e-7, 1], no softmax, no T², in the input dtype. That default
is not a KL divergence (``keras.logits_distillation_default_clips_logits``; a pinned fact in ``facts``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from numpy.typing import NDArray

from klparity.apis.base import ApiSpec
from klparity.apis.keras_kl_divergence import KerasKlDivergence
from klparity.model import Api, Expectation
from klparity.numerics.dtypes import dtype_info
from klparity.numerics.errormodel import Budget

if TYPE_CHECKING:
    from klparity.model import Exact

F64 = NDArray[np.float64]

ENTRY = "keras.distillation.LogitsDistillation"
_KERAS = KerasKlDivergence()


class KerasLogitsDistillation(ApiSpec):
    """``LogitsDistillation.compute_loss`` with ``loss="kl_divergence"`` (default) or ``"KLDivergence"``."""

    semantics = "keras_distillation"
    facts = "klparity.apis.keras_distillation.facts"
    mutants = "klparity.apis.keras_distillation.mutants"
    differences: ClassVar[dict[str, str]] = {
        "keras.logits_distillation_default_clips_logits": "LogitsDistillation's default loss='kl_divergence' "
        "resolves to the function keras.losses.kl_divergence, not a KLDivergence object, so its KL branch "
        "(softmax, T²) is skipped: the logits / T are clipped to [1e-7, 1] and taken as probabilities. The "
        "value is no KL divergence (not even a fixed multiple of one); pass loss='KLDivergence'",
    }

    def expectations(self, api: Api, ex: Exact, dtype: str, compute: str,
                     framework: str) -> tuple[dict[str, Expectation], Budget]:  # fmt: skip
        t2 = ex.temperature**2
        if api.option("loss") == "KLDivergence":  # Keras's KL on the softmaxes, mean over rows, times T²
            inner = replace(api, reductions=("sum_over_batch_size",))
            exps, bud = _KERAS.expectations(inner, ex, dtype, compute, framework)
            e = exps["sum_over_batch_size"]
            u = dtype_info(compute).unit_roundoff
            scaled = replace(
                e, value=np.asarray(e.value * t2), exact=np.asarray(e.exact * t2),
                # + the product by T² (rounded once) and T² itself (T**2 in float64, then cast: one more)
                tolerance=np.asarray(e.tolerance * t2 + 2.0 * u * np.abs(e.value * t2)),
                gap_bound=None if e.gap_bound is None else np.asarray(np.asarray(e.gap_bound) * t2),
            )  # fmt: skip
            return {red: scaled for red in api.reductions}, bud
        # the default: Keras's clipped formula on the logits / T themselves, mean over rows
        as_probs = replace(ex, p=np.asarray(ex.zt, np.float64), q=np.asarray(ex.zs, np.float64))
        inner = replace(api, reductions=("sum_over_batch_size",))
        exps, bud = _KERAS.expectations(inner, as_probs, dtype, compute, framework)
        e = exps["sum_over_batch_size"]
        exp = replace(e, exact=np.asarray(np.mean(ex.rows) * t2), gap_bound=None)
        return {red: exp for red in api.reductions}, bud

    def known_differences(self, api: Api, ex: Exact, compute: str) -> list[str]:
        if api.option("loss") == "KLDivergence":
            return _KERAS.known_differences(api, ex, compute)
        return ["keras.logits_distillation_default_clips_logits"]
