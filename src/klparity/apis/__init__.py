"""Registry of API specs, keyed by ``Api.semantics``. Adding an API: one spec module and one line here.

Each spec (``klparity.apis.base.ApiSpec``) holds everything the engine needs to know about one KL API;
``DIFFERENCES`` / ``GRAD_DIFFERENCES`` gather their documented differences, ``load_facts`` and
``load_mutants`` import the modules that register their pinned facts and mutants.
"""

from __future__ import annotations

import importlib
from typing import Final

from klparity.apis.base import ApiSpec, GradModel
from klparity.apis.keras_distillation import KerasLogitsDistillation
from klparity.apis.keras_kl_divergence import KerasKlDivergence
from klparity.apis.keras_metric_kl import KerasMetricKl
from klparity.apis.mlx_kl_div import MlxKlDiv
from klparity.apis.optax_kl import OptaxKl
from klparity.apis.paddle_kl_div import PaddleKlDiv
from klparity.apis.tf_keras_kl_divergence import TfKerasKlDivergence
from klparity.apis.torch_distributions import TorchDistributionsKl
from klparity.apis.torch_kl_div import TorchKlDiv
from klparity.apis.torchmetrics_kl import TorchmetricsKl
from klparity.apis.trl_gkd import TrlGkd
from klparity.frameworks import REGISTRY
from klparity.model import Api, Expectation

SPECS: dict[str, ApiSpec] = {
    "torch": TorchKlDiv(),
    "keras": KerasKlDivergence(),
    "optax": OptaxKl(),
    "torch_distributions": TorchDistributionsKl(),
    "torchmetrics": TorchmetricsKl(),
    "keras_distillation": KerasLogitsDistillation(),
    "trl_gkd": TrlGkd(),
    "tf_keras": TfKerasKlDivergence(),
    "mlx_kl_div": MlxKlDiv(),
    "paddle_kl_div": PaddleKlDiv(),
    "keras_metric_kl": KerasMetricKl(),
}

#: Not an API's own: any API whose result dtype overflows.
RESULT_OVERFLOW: Final = "dtype.result_overflow"
#: Documented differences between an API's formula and the exact KL (name -> what and why).
DIFFERENCES: Final[dict[str, str]] = {
    **{k: v for s in SPECS.values() for k, v in s.differences.items()},
    RESULT_OVERFLOW: "the value exceeds the largest finite number of the result dtype and "
    "rounds to inf (a float16 sum over many classes; torch's 'batchmean' rounds the sum before "
    "dividing, so it overflows with the sum even when the mean would fit)",
}
#: Documented differences between an API's gradient and the exact gradient (name -> what and why).
GRAD_DIFFERENCES: Final[dict[str, str]] = {k: v for s in SPECS.values() for k, v in s.grad_differences.items()}


def entries(framework: str, dtype: str) -> tuple[Api, ...]:
    """Every API of ``framework`` for ``dtype``: the adapter's own, then those records declare and call."""
    return REGISTRY[framework].apis(dtype) + tuple(a for s in SPECS.values() for a in s.entries(framework, dtype))


def spec(api: Api) -> ApiSpec:
    """The spec of ``api``, with a clear error naming the known ones."""
    try:
        return SPECS[api.semantics]
    except KeyError:
        raise ValueError(f"no API spec for semantics {api.semantics!r} ({api.id}); known: {', '.join(SPECS)}") from None


def load_facts() -> None:
    """Import every spec's pinned-facts module (each registers its facts in ``klparity.engine.pinned.FACTS``)."""
    for s in SPECS.values():
        if s.facts:
            importlib.import_module(s.facts)


def load_mutants() -> None:
    """Import every spec's mutants module (each registers its mutants in ``klparity.engine.mutants.MUTANTS``)."""
    for s in SPECS.values():
        if s.mutants:
            importlib.import_module(s.mutants)


__all__ = ["DIFFERENCES", "GRAD_DIFFERENCES", "SPECS", "ApiSpec", "Expectation", "GradModel", "entries", "load_facts",
           "load_mutants", "spec"]  # fmt: skip
