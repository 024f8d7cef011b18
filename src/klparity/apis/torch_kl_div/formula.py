"""torch's ``F.kl_div`` / ``nn.KLDivLoss`` formula and reductions, evaluated exactly in float64.

The record's exact formula (``klparity.apis.torch_kl_div``); TRL, optax, MLX and Paddle share its
pointwise forms. Built on the oracle's float64 helpers.
"""

from __future__ import annotations

from typing import Final, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from klparity.numerics.oracle import _as_float64, _same_shape

F64 = NDArray[np.float64]

TorchReduction = Literal["none", "sum", "mean", "batchmean"]
TORCH_REDUCTIONS: Final[tuple[str, ...]] = ("none", "sum", "mean", "batchmean")


def torch_pointwise(input: ArrayLike, target: ArrayLike, *, log_target: bool = False) -> F64:
    """torch.nn.functional.kl_div's elementwise loss, exactly, in float64.

    ``log_target=False``: ``xlogy(target, target) - target * input`` (``xlogy(0, y) = 0``), so a class
    with ``target = 0`` and ``input = -inf`` gives ``0 - 0*(-inf) = NaN`` as in torch.
    ``log_target=True``: ``exp(target) * (target - input)``; ``target = input = -inf`` gives NaN.
    """
    x = _as_float64(input, "input")
    y = _as_float64(target, "target")
    _same_shape(x, y, ("input", "target"))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if log_target:
            return np.asarray(np.exp(y) * (y - x), dtype=np.float64)
        xlogy = np.where(y == 0, 0.0, y * np.log(y))
        return np.asarray(xlogy - y * x, dtype=np.float64)


def torch_reduce(pointwise: F64, reduction: str) -> F64:
    """Apply a torch ``kl_div`` reduction to its elementwise loss.

    ``'mean'`` divides by the number of elements (B*C, not the batch); ``'batchmean'`` divides by
    ``input.size(0)``: C for 1-D input, B (not B*S) for (B, S, C) input.
    """
    if reduction not in TORCH_REDUCTIONS:
        raise ValueError(f"unknown torch reduction {reduction!r}; expected one of {TORCH_REDUCTIONS}")
    if reduction == "none":
        return pointwise
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.sum(pointwise)
    if reduction == "sum":
        return np.asarray(total)
    if reduction == "mean":
        return np.asarray(total / pointwise.size)
    if reduction == "batchmean":
        return np.asarray(total / pointwise.shape[0])
    raise ValueError(f"unknown torch reduction {reduction!r}; expected one of {TORCH_REDUCTIONS}")


def torch_kl_div(
    input: ArrayLike, target: ArrayLike, *, reduction: str = "mean", log_target: bool = False
) -> F64:
    """``torch.nn.functional.kl_div(input, target, reduction, log_target)`` evaluated exactly."""
    return torch_reduce(torch_pointwise(input, target, log_target=log_target), reduction)
