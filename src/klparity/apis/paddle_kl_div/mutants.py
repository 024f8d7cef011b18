"""Mutants of Paddle's ``kl_div``: plausible regressions of the kernel and its reductions, each injected by
patching ``paddle.nn.functional.kl_div`` (see ``klparity.engine.mutants``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klparity.apis.mutation import register
from klparity.model import Mutant, Patch

_PADDLE_KL = (("paddle.nn.functional", "kl_div"),)

Change = Callable[[Any, Any, Any, dict[str, Any]], Any]


def _paddle_call(change: Change) -> Patch:
    """Wrap F.kl_div so that ``change(orig, input, label, kwargs)`` replaces the call (keywords only, as the
    adapter calls it: ``reduction`` and ``log_target``)."""

    def wrap(orig: Any) -> Any:
        def kl_div(inp: Any, label: Any, **kwargs: Any) -> Any:
            return change(orig, inp, label, kwargs)

        return kl_div

    return wrap


def _scale_if(dtype_name: str, factor: float) -> Change:
    def change(orig: Any, inp: Any, label: Any, kw: dict[str, Any]) -> Any:
        res = orig(inp, label, **kw)
        return res * factor if str(res.dtype) == f"paddle.{dtype_name}" else res

    return change


def _via(dtype_name: str, lower: str) -> Change:
    def change(orig: Any, inp: Any, label: Any, kw: dict[str, Any]) -> Any:
        if str(inp.dtype) != f"paddle.{dtype_name}":
            return orig(inp, label, **kw)
        return orig(inp.astype(lower), label.astype(lower), **kw).astype(dtype_name)

    return change


def _batchmean_numel(orig: Any, inp: Any, label: Any, kw: dict[str, Any]) -> Any:
    if kw.get("reduction") != "batchmean":
        return orig(inp, label, **kw)
    return orig(inp, label, **{**kw, "reduction": "sum"}) / inp.numel()


def _mean_as_batchmean(orig: Any, inp: Any, label: Any, kw: dict[str, Any]) -> Any:
    if kw.get("reduction", "mean") == "mean":
        kw = {**kw, "reduction": "batchmean"}
    return orig(inp, label, **kw)


def _ignore_log_target(orig: Any, inp: Any, label: Any, kw: dict[str, Any]) -> Any:
    return orig(inp, label, **{**kw, "log_target": False})


register(
    Mutant("paddle_f32_drift", "paddle", "float32 kernel loses accuracy: result × (1 + 3e-5)",
           _PADDLE_KL, _paddle_call(_scale_if("float32", 1 + 3e-5))),
    Mutant("paddle_f64_via_f32", "paddle", "float64 silently computed in float32 (a dispatch bug)",
           _PADDLE_KL, _paddle_call(_via("float64", "float32"))),
    Mutant("paddle_batchmean_numel", "paddle", "'batchmean' divides by numel instead of shape[0]",
           _PADDLE_KL, _paddle_call(_batchmean_numel)),
    Mutant("paddle_mean_is_batchmean", "paddle", "the default 'mean' changed to mean 'batchmean' (÷ shape[0])",
           _PADDLE_KL, _paddle_call(_mean_as_batchmean)),
    Mutant("paddle_log_target_ignored", "paddle", "log_target=True ignored: log-labels read as probabilities",
           _PADDLE_KL, _paddle_call(_ignore_log_target)),
)  # fmt: skip
