"""A catalogue of plausible framework regressions (mutants), each injectable by patching at run time.

Every mutant imitates a real-world bug class — precision drift, a dtype computed in lower precision,
a changed reduction, a flag ignored, NaN/inf handling, bugs that hit only some rows, sizes, layouts or
only gradients, Keras clipping changes — and is installed by replacing a framework function in the
current process. ``klparity mutate`` runs the suite once per mutant (``--klparity-mutant NAME``
installs it in the pytest controller and every xdist worker) and reports which test killed it. A
mutant that survives is a hole in the suite, to be fixed in the suite, never in the mutant.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Patch = Callable[[Any], Any]  # receives the original function, returns the replacement


@dataclass(frozen=True)
class Mutant:
    """One injected regression: where it is patched and the real bug it imitates."""

    name: str
    framework: str
    description: str
    targets: tuple[tuple[str, str], ...]  #: (module, attribute) pairs replaced by ``wrap(original)``
    wrap: Patch


_ACTIVE: list[tuple[Any, str, Any]] = []


def install(mutant: Mutant) -> None:
    """Patch the framework in this process (idempotent per mutant target)."""
    for module_name, attr in mutant.targets:
        module = importlib.import_module(module_name)
        original = getattr(module, attr)
        _ACTIVE.append((module, attr, original))
        setattr(module, attr, mutant.wrap(original))


def uninstall() -> None:
    """Undo every installed patch, most recent first."""
    while _ACTIVE:
        module, attr, original = _ACTIVE.pop()
        setattr(module, attr, original)


# ----------------------------------------------------------------------------------- torch

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


# ----------------------------------------------------------------------------------- keras

_KERAS_FN = (("keras.src.losses.losses", "kl_divergence"), ("keras.losses", "kl_divergence"))
_KERAS_REDUCE = (("keras.src.losses.loss", "reduce_values"),)


def _keras_fn(body: Callable[[Any, Any, Any], Any]) -> Patch:
    """Replace keras's kl_divergence by ``body(ops, y_true, y_pred)`` (after dtype conversion)."""

    def wrap(orig: Any) -> Any:
        def kl_divergence(y_true: Any, y_pred: Any) -> Any:
            from keras import ops

            y_pred = ops.convert_to_tensor(y_pred)
            y_true = ops.convert_to_tensor(y_true, y_pred.dtype)
            return body(ops, y_true, y_pred)

        return kl_divergence

    return wrap


def _keras_clip(eps_true: float, eps_pred: float | None, renormalise: bool = False) -> Patch:
    def body(ops: Any, t: Any, p: Any) -> Any:
        t = ops.clip(t, eps_true, 1)
        if eps_pred is not None:
            p = ops.clip(p, eps_pred, 1)
        if renormalise:
            t = t / ops.sum(t, axis=-1, keepdims=True)
            p = p / ops.sum(p, axis=-1, keepdims=True)
        return ops.sum(t * ops.log(t / p), axis=-1)

    return _keras_fn(body)


def _keras_scaled(factor: float, dtype: str | None = None) -> Patch:
    def wrap(orig: Any) -> Any:
        def kl_divergence(y_true: Any, y_pred: Any) -> Any:
            res = orig(y_true, y_pred)
            return res * factor if dtype is None or res.dtype == dtype else res

        return kl_divergence

    return wrap


def _keras_nan_to_zero(orig: Any) -> Any:
    def kl_divergence(y_true: Any, y_pred: Any) -> Any:
        from keras import ops

        res = orig(y_true, y_pred)
        return ops.where(ops.isnan(res), ops.zeros_like(res), res)

    return kl_divergence


def _keras_reduction(mapping: Callable[[Any, Any, str], Any]) -> Patch:
    def wrap(orig: Any) -> Any:
        def reduce_values(values: Any, sample_weight: Any = None, reduction: str = "sum_over_batch_size") -> Any:
            return mapping(orig, values, reduction) if reduction not in (None, "none") else orig(
                values, sample_weight, reduction
            )

        return reduce_values

    return wrap


def _sum_over_first_axis_only(orig: Any, values: Any, reduction: str) -> Any:
    from keras import ops

    if reduction == "sum_over_batch_size" and len(values.shape) >= 2:
        return ops.sum(values) / values.shape[0]
    return orig(values, None, reduction)


def _mean_as_sum(orig: Any, values: Any, reduction: str) -> Any:
    return orig(values, None, "sum" if reduction == "sum_over_batch_size" else reduction)


MUTANTS: tuple[Mutant, ...] = (
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
    Mutant("keras_epsilon_1e5", "tensorflow", "Keras's clip epsilon becomes 1e-5",
           _KERAS_FN, _keras_clip(1e-5, 1e-5)),
    Mutant("keras_no_pred_clip", "tensorflow", "y_pred no longer clipped (only y_true)",
           _KERAS_FN, _keras_clip(1e-7, None)),
    Mutant("keras_renormalise", "tensorflow", "clipped distributions renormalised to sum 1",
           _KERAS_FN, _keras_clip(1e-7, 1e-7, renormalise=True)),
    Mutant("keras_f32_drift", "tensorflow", "float32 kernel loses accuracy: result × (1 + 1e-4)",
           _KERAS_FN, _keras_scaled(1 + 1e-4, "float32")),
    Mutant("keras_nan_to_zero", "tensorflow", "NaN rows swallowed as 0",
           _KERAS_FN, _keras_nan_to_zero),
    Mutant("keras_3d_divides_by_batch", "tensorflow", "'sum_over_batch_size' on (B, S, C) divides by B only",
           _KERAS_REDUCE, _keras_reduction(_sum_over_first_axis_only)),
    Mutant("keras_default_is_sum", "tensorflow", "'sum_over_batch_size' stops dividing (acts as 'sum')",
           _KERAS_REDUCE, _keras_reduction(_mean_as_sum)),
)  # fmt: skip

BY_NAME: dict[str, Mutant] = {m.name: m for m in MUTANTS}


def get(name: str) -> Mutant:
    """Mutant by name, with a clear error listing the known ones."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown mutant {name!r}; known: {', '.join(BY_NAME)}") from None
