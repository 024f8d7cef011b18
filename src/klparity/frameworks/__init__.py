"""Registry of framework adapters. Adding a framework: one adapter module and one line here."""

from __future__ import annotations

from dataclasses import replace

from klparity.frameworks.base import Adapter, cap_native_threads
from klparity.frameworks.jax_adapter import JaxAdapter
from klparity.frameworks.keras_adapter import KerasAdapter
from klparity.frameworks.mlx_adapter import MlxAdapter
from klparity.frameworks.paddle_adapter import PaddleAdapter
from klparity.frameworks.torch_adapter import TorchAdapter
from klparity.model import DEVICES, LAYOUTS, Api, Output
from klparity.numerics.errormodel import register_profile

REGISTRY: dict[str, Adapter] = {
    "torch": TorchAdapter(),
    "tensorflow": KerasAdapter(),
    "jax": JaxAdapter(),
    "mlx": MlxAdapter(),
    "paddle": PaddleAdapter(),
}
for _name, _adapter in REGISTRY.items():  # each adapter's own rows of the error model
    register_profile(_name, replace(_adapter.error_profile, class_sum_roundings=_adapter.class_sum_roundings))


def runs_user_losses() -> tuple[str, ...]:
    """Frameworks whose adapter runs a user's loss (``Adapter.run_user_loss``, for ``klparity check``)."""
    return tuple(n for n, a in REGISTRY.items() if type(a).run_user_loss is not Adapter.run_user_loss)


def get(name: str) -> Adapter:
    """Adapter by registry name, with a clear error listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown framework {name!r}; known: {', '.join(REGISTRY)}") from None


__all__ = ["DEVICES", "LAYOUTS", "REGISTRY", "Adapter", "Api", "Output", "cap_native_threads", "get",
           "runs_user_losses"]
