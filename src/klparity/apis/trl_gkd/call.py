"""How TRL's ``GKDTrainer.generalized_jsd_loss`` is called: the record's own call, value and gradient.

The torch adapter supplies tensors (``TorchAdapter.logits``) and widening; this module alone knows TRL.
GKDTrainer is looked up at call time, so a patched one (a mutant) is the one called, and in both places
it has lived: ``trl.experimental.gkd`` (TRL 1.x) and ``trl`` (before 1.0).
"""

from __future__ import annotations

import importlib
import math
import warnings
from typing import Any

import numpy as np
from numpy.typing import NDArray

from klparity.frameworks.torch_adapter import TorchAdapter, relayout, to_float64, torch_module
from klparity.model import Api, GradOutput, Output


def valid_rows(shape: tuple[int, ...], labels: object) -> NDArray[np.bool_]:
    """Which rows of the flattened (rows, C) grid the labels keep (the call builds the labels alike)."""
    rows = max(math.prod(shape[:-1]), 1)
    valid = np.ones(rows, dtype=bool)
    if labels == "last-ignored" and rows > 1:
        valid[-1] = False
    return valid


def trainer() -> Any:
    """TRL's GKDTrainer, from where the installed TRL keeps it (``trl.experimental.gkd`` since 1.0)."""
    for module in ("trl.experimental.gkd", "trl"):
        try:
            found = getattr(importlib.import_module(module), "GKDTrainer", None)
        except ModuleNotFoundError:
            continue
        if found is not None:
            return found
    raise ModuleNotFoundError("GKDTrainer is in neither trl.experimental.gkd nor trl")


def call(adapter: TorchAdapter, api: Api, teacher: NDArray[np.generic], student: NDArray[np.generic],
         temperature: float, device: str, layout: str) -> dict[str, Output]:  # fmt: skip
    """generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature, reduction) on the raw
    logits (it divides by T); labels -100 on the last row of the flattened row grid when the API says so."""
    gkd = trainer()
    torch = torch_module()
    zt, zs = adapter.logits(teacher, student, 1.0, device, layout)
    labels = None
    if api.option("labels") != "none":
        keep = valid_rows(tuple(zt.shape), api.option("labels"))
        flat = torch.where(torch.from_numpy(keep), 0, -100).to(zt.device)
        labels = flat.reshape(tuple(zt.shape[:-1]))
    out: dict[str, Output] = {}
    for red in api.reductions:
        kwargs = {} if red == "default" else {"reduction": red}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = gkd.generalized_jsd_loss(zs, zt, labels=labels, beta=float(str(api.option("beta"))),
                                           temperature=temperature, **kwargs)  # fmt: skip
        out[red] = Output(to_float64(res), str(res.dtype).removeprefix("torch."),
                          tuple(str(w.message) for w in caught))  # fmt: skip
    return out


def call_grad(adapter: TorchAdapter, api: Api, teacher: NDArray[np.generic], student: NDArray[np.generic],
              temperature: float, device: str, layout: str) -> dict[str, GradOutput]:  # fmt: skip
    """Gradients of generalized_jsd_loss w.r.t. both logits (the leaves; TRL divides by T inside). The
    arguments it gives kl_div are its own log_softmax of logits / T: recomputed alike as the seen values."""
    gkd = trainer()
    torch = torch_module()
    fn = torch.nn.functional
    dev = "cuda" if device == "gpu" else "cpu"
    tdtype = getattr(torch, str(teacher.dtype))
    t = torch.from_numpy(teacher.astype(np.float64)).to(dev).to(tdtype).requires_grad_(True)
    s = torch.from_numpy(student.astype(np.float64)).to(dev).to(tdtype).requires_grad_(True)
    zt, zs = relayout(t, layout), relayout(s, layout)
    seen_t = to_float64(fn.log_softmax(zt / temperature, dim=-1))
    seen_s = to_float64(fn.log_softmax(zs / temperature, dim=-1))
    beta = float(str(api.option("beta")))
    out: dict[str, GradOutput] = {}
    for red in api.reductions:
        kwargs = {} if red == "default" else {"reduction": red}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = gkd.generalized_jsd_loss(zs, zt, beta=beta, temperature=temperature, **kwargs)
        g_s, g_t = torch.autograd.grad(res, (s, t), grad_outputs=torch.ones_like(res), retain_graph=True)
        out[red] = GradOutput(student=to_float64(g_s), teacher=to_float64(g_t),
                              dtype=str(g_s.dtype).removeprefix("torch."), seen_target=seen_t, seen_input=seen_s,
                              warnings=tuple(str(w.message) for w in caught))  # fmt: skip
    return out
