"""Pinned facts of Keras 3's ``keras.distillation.LogitsDistillation`` (see ``klparity.engine.pinned``)."""

from __future__ import annotations

import numpy as np

from klparity.apis.keras_kl_divergence import formula as keras_formula
from klparity.apis.pinning import fact, logits_in
from klparity.model import Measured
from klparity.numerics import oracle
from klparity.numerics.cases import Case

#: Relative distance within which a float32 result equals a candidate; the candidates differ by far more
#: (T² = 4, and the clipped formula is no multiple of the KL).
FLOAT32_CLOSE = 1e-5

DISTILL = Case("gauss", (4, 10), 2.0, 3.0)


def _candidates(t: np.ndarray, s: np.ndarray, temperature: float) -> dict[str, tuple[float, float]]:
    rows = oracle.kl_from_logits(t, s, temperature)
    clipped = keras_formula.keras_kl_divergence(t / temperature, s / temperature, reduction="none")
    n = rows.size
    return {"T² · mean KL": (float(np.sum(rows)) * temperature**2 / n, 1.0),
            "mean KL": (float(np.sum(rows)) / n, 1.0),
            "mean of the clipped formula on logits / T": (float(np.sum(clipped)) / n, 1.0)}  # fmt: skip


def _measure(loss: str) -> Measured:
    import keras

    t, s = logits_in(DISTILL)
    kd = keras.distillation.LogitsDistillation(temperature=DISTILL.temperature, loss=loss)
    got = float(np.asarray(kd.compute_loss(keras.ops.convert_to_tensor(t), keras.ops.convert_to_tensor(s))))
    cands = _candidates(t, s, DISTILL.temperature)
    # computed in float32 (the Loss object) or float64 (the function): judged at float32's rounding
    hits = [k for k, (v, _) in cands.items() if abs(got - v) <= FLOAT32_CLOSE * abs(v)]
    name = hits[0] if len(hits) == 1 else f"none of {sorted(cands)}" if not hits else f"ambiguous {hits}"
    return Measured(name, f"got {got!r}; " + "; ".join(f"{k} {v[0]!r}" for k, v in cands.items()))


@fact(
    "keras.logits_distillation_default_is_not_kl", "tensorflow",
    "LogitsDistillation(temperature=T) with its default loss='kl_divergence' computes the mean over rows of "
    "kl_divergence(logits_t / T, logits_s / T): the scaled logits clipped to [1e-7, 1], no softmax, no T²",
    "Keras's own distillation API, as documented ('KL divergence'), does not distil: the string resolves to the "
    "function, not the KLDivergence object its KL branch checks for. Pass loss='KLDivergence'",
    "mean of the clipped formula on logits / T",
    requires=("keras.distillation", "tensorflow"),
)  # fmt: skip
def _default_loss() -> Measured:
    return _measure("kl_divergence")


@fact(
    "keras.logits_distillation_kldivergence_t2", "tensorflow",
    "LogitsDistillation(temperature=T, loss='KLDivergence') is T² · the mean over rows of KL(softmax(t/T) ‖ "
    "softmax(s/T)) (Hinton)",
    "the working form of Keras's distillation loss: T² and the per-row mean, as torch users write it",
    "T² · mean KL",
    requires=("keras.distillation", "tensorflow"),
)  # fmt: skip
def _kl_object() -> Measured:
    return _measure("KLDivergence")
