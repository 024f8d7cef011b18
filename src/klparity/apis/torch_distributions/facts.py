"""Pinned facts of ``torch.distributions.kl_divergence`` on two ``Categorical`` (see ``klparity.engine.pinned``)."""

from __future__ import annotations

import numpy as np

from klparity.apis.pinning import NAN, SMALL, fact, logits_in, recorded_warnings, to_np
from klparity.frameworks.torch_adapter import torch_module as _torch
from klparity.model import Measured
from klparity.numerics import oracle


@fact(
    "torch.distributions.first_argument_is_the_teacher", "torch",
    "kl_divergence(Categorical(logits=t/T), Categorical(logits=s/T)) is KL(teacher ‖ student) per row, "
    "unreduced (batch shape), no T²",
    "the argument order is the opposite of F.kl_div's (input = student first)",
    {"rows": "KL(first ‖ second)", "shape": "batch shape"},
)  # fmt: skip
def _first_argument() -> Measured:
    torch = _torch()
    t, s = logits_in(SMALL)
    cat = torch.distributions.Categorical
    got = to_np(torch.distributions.kl_divergence(cat(logits=torch.from_numpy(t)), cat(logits=torch.from_numpy(s))))
    fwd = oracle.kl_from_logits(t, s, SMALL.temperature)
    rev = oracle.kl_from_logits(s, t, SMALL.temperature)
    close = {"KL(first ‖ second)": np.allclose(got, fwd, rtol=1e-12, atol=0),
             "KL(second ‖ first)": np.allclose(got, rev, rtol=1e-12, atol=0)}  # fmt: skip
    rows = [k for k, v in close.items() if v]
    value = {"rows": rows[0] if len(rows) == 1 else f"none of {sorted(close)}",
             "shape": "batch shape" if got.shape == t.shape[:-1] else str(got.shape)}  # fmt: skip
    return Measured(value, f"rows {got.tolist()}; exact forward {fwd.tolist()}")


@fact(
    "torch.distributions.nan_logit_raises", "torch",
    "Categorical validates its arguments by default (validate_args = __debug__): a NaN logit or probability "
    "raises ValueError in the constructor, before any KL is computed",
    "a diverged teacher stops training with an exception instead of a NaN loss; with validate_args=False "
    "(or python -O) the KL is NaN instead",
    {"logits": "ValueError", "probs": "ValueError", "validate_args=False": "nan"},
)  # fmt: skip
def _nan_raises() -> Measured:
    torch = _torch()
    t, s = logits_in(NAN)
    tt, ss = torch.from_numpy(t), torch.from_numpy(s)
    cat = torch.distributions.Categorical
    out: dict[str, str] = {}
    for name in ("logits", "probs"):
        try:
            with recorded_warnings():
                if name == "logits":
                    torch.distributions.kl_divergence(cat(logits=tt), cat(logits=ss))
                else:
                    pt, ps = torch.softmax(tt, -1), torch.softmax(ss, -1)
                    torch.distributions.kl_divergence(cat(probs=pt), cat(probs=ps))
            out[name] = "no error"
        except Exception as e:  # the constructor's validation: whatever it raises is the fact
            out[name] = type(e).__name__
    rows = to_np(torch.distributions.kl_divergence(cat(logits=tt, validate_args=False),
                                                   cat(logits=ss, validate_args=False)))  # fmt: skip
    out["validate_args=False"] = "nan" if np.isnan(rows).any() else "finite"
    return Measured(out, f"rows without validation: {rows.tolist()}")
