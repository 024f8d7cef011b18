"""Pinned facts of torchmetrics' ``kl_divergence`` (see ``klparity.engine.pinned``)."""

from __future__ import annotations

import numpy as np

from klparity.apis.pinning import TEACHER_MASKED, THREE_D, fact, logits_in, to_np
from klparity.model import Measured


@fact(
    "torchmetrics.rejects_three_d", "torch",
    "torchmetrics.functional.kl_divergence takes (N, C) only: (B, S, C) logits raise ValueError (reshape to "
    "(B·S, C) first, which gives the per-token mean)",
    "a sequence-distillation loss cannot pass its (B, S, C) logits as they are",
    "ValueError",
    requires=("torchmetrics", "torchmetrics"),
)  # fmt: skip
def _rejects_3d() -> Measured:
    import torch
    import torchmetrics.functional as tmf

    t, s = logits_in(THREE_D)
    p, q = (torch.softmax(torch.from_numpy(x), -1) for x in (t, s))
    try:
        tmf.kl_divergence(p, q)
    except Exception as e:  # whatever it raises is the fact
        return Measured(type(e).__name__, str(e).splitlines()[0])
    return Measured("no error", "3-D input accepted")


@fact(
    "torchmetrics.zero_teacher_probability_nan_gradient", "torch",
    "a teacher probability that is exactly 0 (a masked class): the value is finite and exact, but its gradient "
    "w.r.t. the student logits is NaN in every entry of the row (0 · log(0 / q) in the backward of p · log(p / q))",
    "distilling with a masked vocabulary through torchmetrics' KL trains on NaN gradients while the loss looks right",
    {"value": "finite", "gradient": "nan"},
    requires=("torchmetrics", "torchmetrics"),
)  # fmt: skip
def _zero_teacher_grad() -> Measured:
    import torch
    import torchmetrics.functional as tmf

    t, s = logits_in(TEACHER_MASKED)
    ss = torch.from_numpy(s).requires_grad_(True)
    loss = tmf.kl_divergence(torch.softmax(torch.from_numpy(t), -1), torch.softmax(ss, -1))
    (g,) = torch.autograd.grad(loss, ss)
    value, grad = float(loss.detach()), to_np(g)
    found = {"value": "finite" if np.isfinite(value) else "not finite",
             "gradient": "nan" if np.isnan(grad).any() else "finite"}  # fmt: skip
    return Measured(found, f"value {value!r}; {int(np.isnan(grad).sum())} of {grad.size} gradient entries NaN")
