"""Distillation losses in Keras 3 (TensorFlow backend), one correct and one per known bug, for ``klparity check``.

Every function takes ``(student_logits, teacher_logits, temperature)`` and is meant to return Hinton's
T² · KL(softmax(teacher / T) ‖ softmax(student / T)), averaged over all rows (B, or B·S tokens).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


def _kl_terms(log_p: Any, log_q: Any) -> Any:
    """p (log p − log q) per class, 0 where p == 0 (== keeps NaN propagating)."""
    p = ops.exp(log_p)
    return ops.where(p == 0, 0.0, p * (log_p - log_q))


def _log_softmax(x: Any, temperature: float = 1.0) -> Any:
    return ops.log_softmax(x / temperature, axis=-1)


def kldivergence(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Correct: KLDivergence()(softmax(t/T), softmax(s/T)) · T²; its default reduction averages all B·S rows.

    Keras clips both distributions to [1e-7, 1]: accepted as correct, reported as keras.clip_epsilon.
    """
    p = ops.softmax(teacher_logits / temperature, axis=-1)
    q = ops.softmax(student_logits / temperature, axis=-1)
    return keras.losses.KLDivergence()(p, q) * temperature**2


def log_space(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Correct and exact (no clipping), also on a masked vocabulary: written in log space."""
    terms = _kl_terms(_log_softmax(teacher_logits, temperature), _log_softmax(student_logits, temperature))
    return ops.mean(ops.sum(terms, axis=-1)) * temperature**2


def mean_over_elements(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: ops.mean over every element (the class axis too): C times too small."""
    terms = _kl_terms(_log_softmax(teacher_logits, temperature), _log_softmax(student_logits, temperature))
    return ops.mean(terms) * temperature**2


def swapped(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: y_true and y_pred exchanged."""
    p = ops.softmax(teacher_logits / temperature, axis=-1)
    q = ops.softmax(student_logits / temperature, axis=-1)
    return keras.losses.KLDivergence()(q, p) * temperature**2


def _kl_div(input_log_probs: Any, target_probs: Any) -> Any:
    """A port of torch's kl_div(input, target, reduction='none'): target · (log target − input)."""
    return ops.where(target_probs == 0, 0.0, target_probs * (ops.log(target_probs) - input_log_probs))


def probs_as_log_probs(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: the ported kl_div wants log-probabilities as its input; softmax is passed."""
    q = ops.softmax(student_logits / temperature, axis=-1)
    p = ops.softmax(teacher_logits / temperature, axis=-1)
    return ops.mean(ops.sum(_kl_div(q, p), axis=-1)) * temperature**2


def student_temperature_only(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: the teacher's softmax is taken at T = 1."""
    p = ops.softmax(teacher_logits, axis=-1)
    q = ops.softmax(student_logits / temperature, axis=-1)
    return keras.losses.KLDivergence()(p, q) * temperature**2


def teacher_temperature_only(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: the student's softmax is taken at T = 1."""
    p = ops.softmax(teacher_logits / temperature, axis=-1)
    q = ops.softmax(student_logits, axis=-1)
    return keras.losses.KLDivergence()(p, q) * temperature**2


def t2_forgotten(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: no T² factor."""
    p = ops.softmax(teacher_logits / temperature, axis=-1)
    q = ops.softmax(student_logits / temperature, axis=-1)
    return keras.losses.KLDivergence()(p, q)


def t2_twice(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: T² applied in a helper and again by the caller."""
    return kldivergence(student_logits, teacher_logits, temperature) * temperature**2


def sum_over_batch_3d(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: the sum over all tokens divided by the batch size B, not by the B·S tokens."""
    p = ops.softmax(teacher_logits / temperature, axis=-1)
    q = ops.softmax(student_logits / temperature, axis=-1)
    total = keras.losses.KLDivergence(reduction="sum")(p, q)
    return total / ops.shape(student_logits)[0] * temperature**2


def naive_log_space(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug on a masked vocabulary: p · (log p − log q) with p = 0 is 0 · (−inf) = NaN."""
    log_p = _log_softmax(teacher_logits, temperature)
    log_q = _log_softmax(student_logits, temperature)
    return ops.mean(ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)) * temperature**2


def log_probs_as_probs(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: KLDivergence takes probabilities; log-probabilities are clipped to 1e-7 and the loss is 0."""
    log_p = _log_softmax(teacher_logits, temperature)
    log_q = _log_softmax(student_logits, temperature)
    return keras.losses.KLDivergence()(log_p, log_q) * temperature**2


def logits_as_probs(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: the softmax is missing; KLDivergence clips the scaled logits to [1e-7, 1]."""
    return keras.losses.KLDivergence()(teacher_logits / temperature, student_logits / temperature) * temperature**2


def cross_entropy(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: soft-target cross-entropy (from the student's logits) instead of KL: off by T² · H(teacher)."""
    p = ops.softmax(teacher_logits / temperature, axis=-1)
    return ops.mean(keras.losses.categorical_crossentropy(p, student_logits / temperature, from_logits=True)) \
        * temperature**2  # fmt: skip


def fixed_batch_size(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: the summed KL divided by the configured batch size, 32, not by the rows it was given."""
    batch_size = 32
    p = ops.softmax(teacher_logits / temperature, axis=-1)
    q = ops.softmax(student_logits / temperature, axis=-1)
    return keras.losses.KLDivergence(reduction="sum")(p, q) / batch_size * temperature**2


def mean_over_elements_t2_forgotten(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Two bugs: ops.mean over every element (C times too small) and no T² factor."""
    return mean_over_elements(student_logits, teacher_logits, temperature) / temperature**2
