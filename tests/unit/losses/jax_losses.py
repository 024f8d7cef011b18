"""Distillation losses in JAX/optax, one correct and one per known bug, for ``klparity check`` and its tests.

Every function takes ``(student_logits, teacher_logits, temperature)`` and is meant to return Hinton's
T² · KL(softmax(teacher / T) ‖ softmax(student / T)), averaged over all rows (B, or B·S tokens).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def optax_kl(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Correct: optax.losses.kl_divergence(log_softmax(s/T), softmax(t/T)) per row, mean over rows, · T²."""
    log_q = jax.nn.log_softmax(student_logits / temperature)
    p = jax.nn.softmax(teacher_logits / temperature)
    return optax.losses.kl_divergence(log_q, p).mean() * temperature**2


def log_targets(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Correct: kl_divergence_with_log_targets(log q, log p), mean over rows, · T²."""
    log_q = jax.nn.log_softmax(student_logits / temperature)
    log_p = jax.nn.log_softmax(teacher_logits / temperature)
    return optax.losses.kl_divergence_with_log_targets(log_q, log_p).mean() * temperature**2


def swapped(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: the student's probabilities as targets: the reverse KL(student‖teacher)."""
    log_p = jax.nn.log_softmax(teacher_logits / temperature)
    q = jax.nn.softmax(student_logits / temperature)
    return optax.losses.kl_divergence(log_p, q).mean() * temperature**2


def mean_over_elements(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: jnp.mean over every element of the pointwise terms (the class axis too): C times too small."""
    log_q = jax.nn.log_softmax(student_logits / temperature)
    log_p = jax.nn.log_softmax(teacher_logits / temperature)
    return jnp.mean(jnp.exp(log_p) * (log_p - log_q)) * temperature**2


def t2_forgotten(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: no T² factor."""
    return optax_kl(student_logits, teacher_logits, temperature) / temperature**2


def cross_entropy(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: optax.softmax_cross_entropy with the teacher's probabilities: off by T² · H(teacher)."""
    p = jax.nn.softmax(teacher_logits / temperature)
    return optax.softmax_cross_entropy(student_logits / temperature, p).mean() * temperature**2


def batch_divisor_3d(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: the sum over all tokens divided by B = shape[0], not by the B·S tokens."""
    log_q = jax.nn.log_softmax(student_logits / temperature)
    p = jax.nn.softmax(teacher_logits / temperature)
    return optax.losses.kl_divergence(log_q, p).sum() / student_logits.shape[0] * temperature**2


def stop_gradient(student_logits: Any, teacher_logits: Any, temperature: float) -> Any:
    """Bug: the student passed through stop_gradient: the value is right, no gradient reaches it."""
    return optax_kl(jax.lax.stop_gradient(student_logits), teacher_logits, temperature)
