"""Mutants of MLX's ``kl_div_loss``: plausible regressions of its reductions and its kernel, each injected by
patching ``mlx.nn.losses.kl_div_loss`` (the adapter looks it up at call time; see ``klparity.engine.mutants``).
"""

from __future__ import annotations

from typing import Any

from klparity.apis.mutation import register
from klparity.model import Mutant

_MLX_KL = (("mlx.nn.losses", "kl_div_loss"),)


def _mean_over_elements(orig: Any) -> Any:
    """reduction='mean' divides by every element (rows · C), not by the rows: torch's 'mean' ported over."""

    def kl_div_loss(inputs: Any, targets: Any, axis: int = -1, reduction: str = "none") -> Any:
        res = orig(inputs, targets, axis=axis, reduction=reduction)
        return res / inputs.shape[axis] if reduction == "mean" else res

    return kl_div_loss


def _float32_drift(orig: Any) -> Any:
    """float32 results drift by a relative 1e-4 (an approximate exp or a narrowed accumulator)."""

    def kl_div_loss(inputs: Any, targets: Any, axis: int = -1, reduction: str = "none") -> Any:
        import mlx.core as mx

        res = orig(inputs, targets, axis=axis, reduction=reduction)
        return res * (1.0 + 1e-4) if res.dtype == mx.float32 else res

    return kl_div_loss


def _reversed(orig: Any) -> Any:
    """The arguments swapped: KL(student ‖ teacher) instead of KL(teacher ‖ student)."""

    def kl_div_loss(inputs: Any, targets: Any, axis: int = -1, reduction: str = "none") -> Any:
        return orig(targets, inputs, axis=axis, reduction=reduction)

    return kl_div_loss


register(
    Mutant("mlx_mean_numel", "mlx", "mlx.nn.losses.kl_div_loss 'mean' divides by rows · C, not by the rows",
           _MLX_KL, _mean_over_elements),
    Mutant("mlx_float32_drift", "mlx", "mlx.nn.losses.kl_div_loss float32 results off by a relative 1e-4",
           _MLX_KL, _float32_drift),
    Mutant("mlx_reversed", "mlx", "mlx.nn.losses.kl_div_loss computes KL(student ‖ teacher)",
           _MLX_KL, _reversed),
)  # fmt: skip
