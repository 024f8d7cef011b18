"""Distillation losses in PyTorch, one correct and one per known bug, for ``klparity check`` and its tests.

Every function takes ``(student_logits, teacher_logits, temperature)`` and is meant to return Hinton's
T² · KL(softmax(teacher / T) ‖ softmax(student / T)), averaged over all rows (B, or B·S tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, S, C) -> (B·S, C): every token is a row of the batch."""
    return x.reshape(-1, x.shape[-1])


def distilbert(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Correct: DistilBERT's loss, KLDivLoss('batchmean')(log_softmax(s/T), softmax(t/T)) · T², over token rows.

    NaN on a class masked with -inf in both teacher and student (torch computes 0 · log 0 as
    0 · (-inf)): fine unless the vocabulary is masked (see ``masked_safe``).
    """
    log_q = F.log_softmax(_rows(student_logits) / temperature, dim=-1)
    p = F.softmax(_rows(teacher_logits) / temperature, dim=-1)
    return nn.KLDivLoss(reduction="batchmean")(log_q, p) * temperature**2


def masked_safe(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Correct, also on a masked vocabulary: log q is set to 0 where p == 0 (== keeps NaN propagating)."""
    log_q = F.log_softmax(_rows(student_logits) / temperature, dim=-1)
    p = F.softmax(_rows(teacher_logits) / temperature, dim=-1)
    log_q = log_q.masked_fill(p == 0, 0.0)
    return nn.KLDivLoss(reduction="batchmean")(log_q, p) * temperature**2


def reduction_mean(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Bug: reduction='mean' divides by every element, B·C: C times too small."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    p = F.softmax(teacher_logits / temperature, dim=-1)
    return nn.KLDivLoss(reduction="mean")(log_q, p) * temperature**2


def swapped(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Bug: the teacher's log-probabilities as the input, the student's probabilities as the target."""
    log_p = F.log_softmax(_rows(teacher_logits) / temperature, dim=-1)
    q = F.softmax(_rows(student_logits) / temperature, dim=-1)
    return F.kl_div(log_p, q, reduction="batchmean") * temperature**2


def probs_as_log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Bug: kl_div's input must be log-probabilities; softmax is passed."""
    q = F.softmax(_rows(student_logits) / temperature, dim=-1)
    p = F.softmax(_rows(teacher_logits) / temperature, dim=-1)
    return F.kl_div(q, p, reduction="batchmean") * temperature**2


def student_temperature_only(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             temperature: float) -> torch.Tensor:  # fmt: skip
    """Bug: the teacher's softmax is taken at T = 1."""
    log_q = F.log_softmax(_rows(student_logits) / temperature, dim=-1)
    p = F.softmax(_rows(teacher_logits), dim=-1)
    return F.kl_div(log_q, p, reduction="batchmean") * temperature**2


def teacher_temperature_only(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             temperature: float) -> torch.Tensor:  # fmt: skip
    """Bug: the student's log-softmax is taken at T = 1."""
    log_q = F.log_softmax(_rows(student_logits), dim=-1)
    p = F.softmax(_rows(teacher_logits) / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="batchmean") * temperature**2


def t2_forgotten(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Bug: no T² factor."""
    log_q = F.log_softmax(_rows(student_logits) / temperature, dim=-1)
    p = F.softmax(_rows(teacher_logits) / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="batchmean")


def t2_twice(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Bug: T² applied in a helper and again by the caller."""
    return distilbert(student_logits, teacher_logits, temperature) * temperature**2


def batchmean_3d(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Bug: batchmean on (B, S, C) input divides by B, not by the B·S tokens."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    p = F.softmax(teacher_logits / temperature, dim=-1)
    return nn.KLDivLoss(reduction="batchmean")(log_q, p) * temperature**2


def detached(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Bug: the right value, but the student logits are detached: no gradient."""
    return distilbert(student_logits.detach(), teacher_logits, temperature)


def swallows_nan(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Bug: nan_to_num hides a NaN logit (a diverged teacher or student) behind a finite loss."""
    return torch.nan_to_num(masked_safe(student_logits, teacher_logits, temperature), nan=0.0)


def per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Correct for ``--expect per-token``: T² · KL per row (per token of a (B, S, C) input)."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    p = F.softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="none").sum(-1) * temperature**2


def log_target_without_flag(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float) -> torch.Tensor:  # fmt: skip
    """Bug: the teacher's log-probabilities as the target, without log_target=True: NaN."""
    log_q = F.log_softmax(_rows(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(_rows(teacher_logits) / temperature, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean") * temperature**2


def no_temperature(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """A classifier's distillation loss with no temperature argument (T = 1, as often written for (B, C)
    logits): KL(teacher ‖ student) averaged over rows. Correct under ``--temperature 1``."""
    s = F.log_softmax(_rows(student_logits), dim=-1)
    t = F.log_softmax(_rows(teacher_logits), dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True)


def cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Bug: cross-entropy with soft targets instead of KL: off by T² · H(teacher), gradient right."""
    p = F.softmax(_rows(teacher_logits) / temperature, dim=-1)
    return F.cross_entropy(_rows(student_logits) / temperature, p) * temperature**2


def fixed_seq_len(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Bug: the sum over tokens divided by a hard-coded max_seq_len of 128."""
    max_seq_len = 128
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    p = F.softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="sum") / max_seq_len * temperature**2


def mean_and_t2_forgotten(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          temperature: float) -> torch.Tensor:  # fmt: skip
    """Two bugs: reduction='mean' (divides by every element) and no T² factor."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    p = F.softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="mean")


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reverse KL(student‖teacher) on purpose (mode-seeking distillation, MiniLLM-style), per token, with T².

    Correct under ``--expect reverse-kl``; under the default convention the diagnosis is reverse-kl.
    """
    log_q = F.log_softmax(_rows(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(_rows(teacher_logits) / temperature, dim=-1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    beta: float = 0.5) -> torch.Tensor:  # fmt: skip
    """The generalized Jensen–Shannon divergence of GKD (on-policy distillation), as TRL writes it:
    beta · KL(teacher‖m) + (1 − beta) · KL(student‖m), m = beta · teacher + (1 − beta) · student, mixed
    in log space, summed over classes, averaged over tokens; no T² factor.

    Correct under ``--expect jsd:0.5,no-t2``; under the default convention the diagnosis is jsd 0.5
    with t2-forgotten.
    """
    log_q = F.log_softmax(_rows(student_logits) / temperature, dim=-1)
    log_p = F.log_softmax(_rows(teacher_logits) / temperature, dim=-1)
    b = torch.tensor(beta, dtype=log_q.dtype)
    log_m = torch.logsumexp(torch.stack([log_q + torch.log1p(-b), log_p + torch.log(b)]), dim=0)
    kl_teacher = F.kl_div(log_m, log_p, reduction="none", log_target=True)
    kl_student = F.kl_div(log_m, log_q, reduction="none", log_target=True)
    jsd = beta * kl_teacher + (1 - beta) * kl_student
    return jsd.sum() / log_q.shape[0]


def jsd_beta_03(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The generalized JSD at beta 0.3 with T²: the diagnosis must name beta 0.3."""
    return generalized_jsd(student_logits, teacher_logits, temperature, beta=0.3) * temperature**2
