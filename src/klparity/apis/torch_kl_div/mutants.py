"""Mutants of torch's ``kl_div``: plausible regressions of the kernel, its reductions and its backward,
each injected by patching ``torch.nn.functional.kl_div`` (see ``klparity.engine.mutants``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klparity.apis.mutation import register
from klparity.model import Mutant, Patch

_TORCH_KL = (("torch.nn.functional", "kl_div"),)


def _torch_result(change: Callable[[Any, Any, Any, dict[str, Any]], Any]) -> Patch:
    """Wrap F.kl_div so that ``change(result, input, target, kwargs)`` alters its output."""

    def wrap(orig: Any) -> Any:
        def kl_div(inp: Any, tgt: Any, *args: Any, **kwargs: Any) -> Any:
            return change(orig(inp, tgt, *args, **kwargs), inp, tgt, kwargs)

        return kl_div

    return wrap


def _torch_call(change: Callable[[Any, Any, Any, dict[str, Any]], Any]) -> Patch:
    """Wrap F.kl_div so that ``change(orig, input, target, kwargs)`` replaces the call."""

    def wrap(orig: Any) -> Any:
        def kl_div(inp: Any, tgt: Any, *args: Any, **kwargs: Any) -> Any:
            return change(orig, inp, tgt, kwargs)

        return kl_div

    return wrap


def _scale_if(dtype_name: str, factor: float) -> Callable[[Any, Any, Any, dict[str, Any]], Any]:
    def change(res: Any, inp: Any, tgt: Any, kw: dict[str, Any]) -> Any:
        return res * factor if str(res.dtype) == f"torch.{dtype_name}" else res

    return change


def _via(dtype_name: str, lower: str) -> Callable[[Any, Any, Any, dict[str, Any]], Any]:
    def change(orig: Any, inp: Any, tgt: Any, kw: dict[str, Any]) -> Any:
        if str(inp.dtype) != f"torch.{dtype_name}":
            return orig(inp, tgt, **kw)
        import torch

        low = getattr(torch, lower)
        return orig(inp.to(low), tgt.to(low), **kw).to(inp.dtype)

    return change


def _reduce(pointwise: Any, inp: Any, reduction: str) -> Any:
    if reduction == "none":
        return pointwise
    total = pointwise.sum()
    return {"sum": total, "mean": total / pointwise.numel(), "batchmean": total / inp.size(0)}[reduction]


def _pointwise_then(edit: Callable[[Any, Any, Any, dict[str, Any]], Any]) -> Callable[..., Any]:
    """Compute the elementwise loss, let ``edit`` change it, then reduce it as torch documents."""

    def change(orig: Any, inp: Any, tgt: Any, kw: dict[str, Any]) -> Any:
        orig(inp, tgt, **kw)  # the real call, for its side effects ('mean' warns): only the value changes
        kw = dict(kw)
        reduction = kw.pop("reduction", "mean")
        pointwise = edit(orig(inp, tgt, reduction="none", **kw), inp, tgt, kw)
        return _reduce(pointwise, inp, reduction)

    return change


def _batchmean_divisor(divisor: Callable[[Any], int]) -> Callable[..., Any]:
    def change(orig: Any, inp: Any, tgt: Any, kw: dict[str, Any]) -> Any:
        if kw.get("reduction") != "batchmean":
            return orig(inp, tgt, **kw)
        return orig(inp, tgt, **{**kw, "reduction": "sum"}) / divisor(inp)

    return change


def _mean_as_batchmean(orig: Any, inp: Any, tgt: Any, kw: dict[str, Any]) -> Any:
    if kw.get("reduction", "mean") == "mean":
        kw = {**kw, "reduction": "batchmean"}
    return orig(inp, tgt, **kw)


def _ignore_log_target(orig: Any, inp: Any, tgt: Any, kw: dict[str, Any]) -> Any:
    return orig(inp, tgt, **{**kw, "log_target": False})


def _zero_target_nan(p: Any, inp: Any, tgt: Any, kw: dict[str, Any]) -> Any:
    import torch

    zero = tgt == float("-inf") if kw.get("log_target") else tgt == 0
    return torch.where(zero, torch.full_like(p, float("nan")), p)


def _masked_to_zero(p: Any, inp: Any, tgt: Any, kw: dict[str, Any]) -> Any:
    import torch

    return torch.where(inp == float("-inf"), torch.zeros_like(p), p)


def _nan_to_zero(p: Any, inp: Any, tgt: Any, kw: dict[str, Any]) -> Any:
    import torch

    return torch.nan_to_num(p, nan=0.0, posinf=float("inf"), neginf=float("-inf"))


def _first_row(p: Any, inp: Any, tgt: Any, kw: dict[str, Any]) -> Any:
    if p.dim() < 2:
        return p
    p = p.clone()
    p[0] = p[0] * (1 + 1e-3)
    return p


def _large_vocab(p: Any, inp: Any, tgt: Any, kw: dict[str, Any]) -> Any:
    return p * (1 + 1e-3) if inp.shape[-1] > 16384 else p


def _non_contiguous(p: Any, inp: Any, tgt: Any, kw: dict[str, Any]) -> Any:
    return p if inp.is_contiguous() else p * (1 + 1e-3)


def _student_inf_clamped(orig: Any, inp: Any, tgt: Any, kw: dict[str, Any]) -> Any:
    return orig(inp.clamp(min=-1e4), tgt, **kw)


def _half_sum(orig: Any, inp: Any, tgt: Any, kw: dict[str, Any]) -> Any:
    """float16 inputs summed in a float16 accumulator (sequentially), not float32."""
    import torch

    orig(inp, tgt, **kw)  # the real call, for its side effects ('mean' warns): only the value changes
    kw = dict(kw)
    reduction = kw.pop("reduction", "mean")
    pointwise = orig(inp, tgt, reduction="none", **kw)
    if inp.dtype != torch.float16 or reduction == "none":
        return _reduce(pointwise, inp, reduction)
    acc = torch.zeros((), dtype=torch.float16)
    for chunk in pointwise.reshape(-1).split(256):
        acc = (acc + chunk.sum().to(torch.float16)).to(torch.float16)
    divisor = {"sum": 1, "mean": pointwise.numel(), "batchmean": inp.size(0)}[reduction]
    return acc / divisor


def _backward_scaled(orig: Any) -> Any:
    """Forward untouched, backward × 1.01 (a wrong derivative formula in the autograd kernel)."""
    import torch

    class _ScaleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any) -> Any:
            return x.view_as(x)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            return grad * 1.01

    def kl_div(inp: Any, tgt: Any, *args: Any, **kwargs: Any) -> Any:
        return _ScaleGrad.apply(orig(inp, tgt, *args, **kwargs))  # type: ignore[no-untyped-call]

    return kl_div


register(
    Mutant("torch_f64_drift", "torch", "float64 kernel loses accuracy: result × (1 + 1e-11)",
           _TORCH_KL, _torch_result(_scale_if("float64", 1 + 1e-11))),
    Mutant("torch_f32_drift", "torch", "float32 kernel loses accuracy: result × (1 + 3e-5)",
           _TORCH_KL, _torch_result(_scale_if("float32", 1 + 3e-5))),
    Mutant("torch_f16_drift", "torch", "float16 kernel loses accuracy: result × (1 + 1e-2)",
           _TORCH_KL, _torch_result(_scale_if("float16", 1 + 1e-2))),
    Mutant("torch_bf16_drift", "torch", "bfloat16 kernel loses accuracy: result × (1 + 5e-2)",
           _TORCH_KL, _torch_result(_scale_if("bfloat16", 1 + 5e-2))),
    Mutant("torch_f64_via_f32", "torch", "float64 silently computed in float32 (a dispatch bug)",
           _TORCH_KL, _torch_call(_via("float64", "float32"))),
    Mutant("torch_f32_via_bf16", "torch", "float32 silently computed in bfloat16 (autocast leaking)",
           _TORCH_KL, _torch_call(_via("float32", "bfloat16"))),
    Mutant("torch_f16_sum_in_f16", "torch", "float16 reductions accumulate in float16, not float32",
           _TORCH_KL, _torch_call(_half_sum)),
    Mutant("torch_batchmean_numel", "torch", "'batchmean' divides by numel (the old 'mean' bug)",
           _TORCH_KL, _torch_call(_batchmean_divisor(lambda x: x.numel()))),
    Mutant("torch_batchmean_rows", "torch", "'batchmean' on (B, S, C) divides by B*S (all rows)",
           _TORCH_KL, _torch_call(_batchmean_divisor(lambda x: max(x.numel() // x.shape[-1], 1)))),
    Mutant("torch_batchmean_1d", "torch", "'batchmean' on 1-D input divides by 1 instead of C",
           _TORCH_KL, _torch_call(_batchmean_divisor(lambda x: 1 if x.dim() == 1 else x.size(0)))),
    Mutant("torch_mean_is_batchmean", "torch", "'mean' changed to mean 'batchmean' (announced in its warning)",
           _TORCH_KL, _torch_call(_mean_as_batchmean)),
    Mutant("torch_log_target_ignored", "torch", "log_target=True ignored: log-targets read as probabilities",
           _TORCH_KL, _torch_call(_ignore_log_target)),
    Mutant("torch_zero_target_nan", "torch", "a zero-probability target class yields NaN (log(0) leak)",
           _TORCH_KL, _torch_call(_pointwise_then(_zero_target_nan))),
    Mutant("torch_masked_zero", "torch", "masked classes silently give 0 instead of NaN (semantic change)",
           _TORCH_KL, _torch_call(_pointwise_then(_masked_to_zero))),
    Mutant("torch_nan_to_zero", "torch", "NaN swallowed: nan_to_num inside the kernel",
           _TORCH_KL, _torch_call(_pointwise_then(_nan_to_zero))),
    Mutant("torch_first_row", "torch", "only the first row is off by 1e-3 (a tail/remainder-loop bug)",
           _TORCH_KL, _torch_call(_pointwise_then(_first_row))),
    Mutant("torch_large_vocab", "torch", "vocabularies above 16384 classes off by 1e-3 (a tiling bug)",
           _TORCH_KL, _torch_call(_pointwise_then(_large_vocab))),
    Mutant("torch_non_contiguous", "torch", "non-contiguous inputs off by 1e-3 (a stride bug)",
           _TORCH_KL, _torch_call(_pointwise_then(_non_contiguous))),
    Mutant("torch_student_inf_clamped", "torch", "student -inf clamped to -1e4: an inf KL turns finite",
           _TORCH_KL, _torch_call(_student_inf_clamped)),
    Mutant("torch_backward_scaled", "torch", "only the gradient is off: backward × 1.01, forward exact",
           _TORCH_KL, _backward_scaled),
)  # fmt: skip
