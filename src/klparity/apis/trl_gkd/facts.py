"""Pinned facts of TRL's ``GKDTrainer.generalized_jsd_loss`` (see ``klparity.engine.pinned``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from klparity.apis.pinning import THREE_D, fact, logits_in
from klparity.frameworks.torch_adapter import torch_module as _torch
from klparity.model import Measured
from klparity.numerics import oracle
from klparity.numerics.cases import Case

HOT = Case("gauss", (2, 3, 10), 2.0, 3.0)
#: a float64 result equals a candidate to within this relative distance; the candidates differ by a
#: factor S = 3 or T² = 4, or are other divergences
FLOAT64_CLOSE = 1e-12



def _loss(case: Case, beta: float, **kwargs: object) -> float:
    from trl.experimental.gkd import GKDTrainer

    trainer: Any = GKDTrainer  # TRL's annotations are partial
    torch = _torch()
    t, s = logits_in(case)
    res = trainer.generalized_jsd_loss(torch.from_numpy(s), torch.from_numpy(t), beta=beta,
                                          temperature=case.temperature, **kwargs)  # fmt: skip
    return float(res)


def _named(got: float, candidates: dict[str, float]) -> str:
    hits = [k for k, v in candidates.items() if abs(got - v) <= FLOAT64_CLOSE * abs(v)]
    return hits[0] if len(hits) == 1 else f"none of {sorted(candidates)} (got {got!r})" if not hits else f"{hits}"


@fact(
    "trl.beta_0_forward_beta_1_reverse", "torch",
    "generalized_jsd_loss(student, teacher, beta) at beta 0 is the forward KL(teacher ‖ student), at beta 1 the "
    "reverse KL(student ‖ teacher), divided by T inside, with no T² factor",
    "GKD's beta picks the direction of the KL; a T² is the caller's to add (GKDTrainer passes no temperature)",
    {"beta 0": "forward KL sum / B", "beta 1": "reverse KL sum / B"},
    requires=("trl", "trl"),
)  # fmt: skip
def _directions() -> Measured:
    t, s = logits_in(HOT)
    fwd, rev = oracle.kl_from_logits(t, s, HOT.temperature), oracle.kl_from_logits(s, t, HOT.temperature)
    b = HOT.shape[0]
    cands = {"forward KL sum / B": float(np.sum(fwd)) / b, "reverse KL sum / B": float(np.sum(rev)) / b,
             "T² · forward KL sum / B": float(np.sum(fwd)) * HOT.temperature**2 / b}  # fmt: skip
    got = {f"beta {k:g}": _loss(HOT, k) for k in (0.0, 1.0)}
    return Measured({k: _named(v, cands) for k, v in got.items()}, f"got {got}; candidates {cands}")


@fact(
    "trl.batchmean_divides_by_first_axis", "torch",
    "reduction='batchmean' without labels divides the sum by size(0): B on (B, S, C) logits, not the B·S tokens",
    "sequence distillation without labels gets an S times larger loss than its per-token mean",
    "sum / B",
    requires=("trl", "trl"),
)  # fmt: skip
def _batchmean() -> Measured:
    t, s = logits_in(THREE_D)
    rows = oracle.kl_from_logits(t, s, THREE_D.temperature)
    cands = {"sum / B": float(np.sum(rows)) / THREE_D.shape[0], "sum / (B·S)": float(np.mean(rows))}
    got = _loss(THREE_D, 0.0)
    return Measured(_named(got, cands), f"got {got!r}; candidates {cands}")
