"""Apple MLX adapter: ``mlx.nn.losses.kl_div_loss`` on the CPU (the Linux ``mlx[cpu]`` wheel).

``kl_div_loss(inputs, targets, axis=-1, reduction="none")`` takes *log*-probabilities on both sides, the
student first: ``sum(exp(targets) * (targets - inputs), axis)``, reduced by ``"none"`` (one value per row,
the default), ``"mean"`` (÷ rows) or ``"sum"``. The student goes in as ``mlx.nn.log_softmax(s / T)``, the
target as ``mlx.nn.log_softmax(t / T)``, all computed by MLX in the tested dtype, as a distillation step
writes them.

Dtypes: float16, bfloat16 and float32. Not float64: ``mx.array`` of a float64 NumPy array silently makes
float32 unless ``dtype=mx.float64`` is passed, and even then MLX's CPU ``exp`` (the kernel's ``exp(targets)``
and ``logsumexp``) is only float32-accurate in float64 (pinned facts of ``klparity.apis.mlx_kl_div.facts``):
a float64 KL from MLX carries errors ~1e-7 relative, far outside a float64 error model.

Devices: the CPU only. MLX's GPU backends are Metal (macOS, Apple silicon) and, on Linux, separate CUDA
builds (``mlx[cuda12]`` / ``mlx[cuda13]``); the CPU wheel has neither (``mx.is_available(mx.gpu)`` is False).
The spec's error model (sequential sums, ``exp`` flushing subnormals) is measured on the CPU backend: a GPU
device would need its own measurements before its cells could be judged.

Threads: MLX has no intra-op thread setting (no API, no environment variable in 0.32.4); its CPU kernels run
on the CPU stream's one worker thread (measured: evaluating the loss adds one thread to the process), and the
loss uses no BLAS. ``RUNTIME.threads`` is therefore not applied: there is nothing to cap.

``mlx.nn.log_softmax`` is an ``mx.compile``'d function: on the CPU, MLX compiles its fused kernels with the
system C++ compiler on first use (~0.4 s per dtype, cached under the temporary directory) and falls back to
the uncompiled ops where there is no compiler; the fused kernel is the same single subtraction either way.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from types import ModuleType
from typing import Any, ClassVar, Final

import numpy as np
from numpy.typing import NDArray

from klparity.frameworks.base import Adapter
from klparity.model import Api, ErrorProfile, Output, Row
from klparity.numerics.errormodel import sequential_roundings

ENTRY: Final = "mlx.nn.losses.kl_div_loss"
#: No ``"default"`` label: it would resolve to ``"none"``, and ``checks._reduction_consistency`` compares
#: each label but ``"none"`` with a scalar reduction of the ``"none"`` output (an array). The default
#: (``"none"``, one value per row) is pinned instead: fact ``mlx.kl_div_loss_is_forward_kl_per_row``.
REDUCTIONS: Final = ("none", "sum", "mean")
DTYPES: Final = ("float16", "bfloat16", "float32")


class MlxAdapter(Adapter):
    """``mlx.nn.losses.kl_div_loss`` (student log-probs, teacher log-probs), every reduction, CPU."""

    #: Its own rows of the error model (``klparity.numerics.errormodel``). ``sequential_sums``, measured:
    #: MLX's CPU ``mx.sum`` over the last axis (Linux wheel) equals a float32 left-to-right loop bit for
    #: bit for 1000, 32000 and 128000 terms (relative error 5e-6 at 32000 where NumPy's pairwise sum errs
    #: by 3e-8), and its logsumexp over 32000 classes is off by 2.5e-5; float16 and bfloat16 accumulate
    #: the same way in float32.
    error_profile: ClassVar[ErrorProfile] = ErrorProfile(
        rows={
            "float16": Row(2, 3, "float32", "MLX's CPU kernels compute each elementwise op in float32 and "
                           "round it to float16; mx.sum and logsumexp accumulate in float32 and round once "
                           "(measured: a float16 sum of 32000 terms comes out correctly rounded), "
                           "sequentially (sequential_sums)"),
            "bfloat16": Row(2, 3, "float32", "as float16: bfloat16 elementwise, float32 sequential sums"),
        },
        sequential_sums=frozenset({"float16", "bfloat16", "float32"}),
    )

    name = "mlx"
    module = "mlx"
    distribution = "mlx"
    extra = "mlx"
    id_prefixes = ("mlx",)
    import_names = ("mlx",)
    short_names = (("mlx.nn.losses.", "mlx."),)
    plot_style = "d-."
    dtypes = DTYPES
    _mods: tuple[ModuleType, ModuleType] | None = None

    def version(self) -> str:
        """mlx's version and, on Linux, that of its backend wheel (``mlx-cpu`` holds the CPU kernels)."""
        v = super().version()
        try:
            return f"{v} (mlx-cpu {importlib.metadata.version('mlx-cpu')})"
        except importlib.metadata.PackageNotFoundError:
            return v

    def _mlx(self) -> tuple[ModuleType, ModuleType]:
        """(``mlx.core``, ``mlx.nn``), imported on first use (no thread setting to apply: see the module
        docstring)."""
        if MlxAdapter._mods is None:
            import mlx.core as mx
            import mlx.nn as nn

            MlxAdapter._mods = (mx, nn)
        return MlxAdapter._mods

    def _mx(self) -> ModuleType:
        """``mlx.core``."""
        return self._mlx()[0]

    def _nn(self) -> ModuleType:
        """``mlx.nn`` (its ``losses.kl_div_loss`` looked up at each call, so that a patched one is called)."""
        return self._mlx()[1]

    def reduction_roundings(self, reduction: str, n: int) -> float:
        """MLX's CPU ``mx.sum`` / ``mx.mean`` add one term at a time (``tolerances.SEQUENTIAL_SUMS``)."""
        return sequential_roundings(n)

    def devices(self) -> tuple[str, ...]:
        self._mx()
        return ("cpu",)

    def device_names(self) -> dict[str, str]:
        return {"cpu": "cpu (MLX CPU backend)"}

    def apis(self, dtype: str) -> tuple[Api, ...]:
        return (Api(self.name, ENTRY, "mlx_kl_div", REDUCTIONS),)

    def compute_dtype(self, api: Api, dtype: str) -> str:
        return dtype

    def to_mlx(self, x: NDArray[np.generic]) -> Any:
        """The array as an MLX array of its own dtype, exactly, on the CPU.

        The dtype is always passed: without it a float64 array silently becomes float32. bfloat16 goes
        through float32 (exact: every bfloat16 value is a float32 value).
        """
        mx = self._mx()
        name = str(x.dtype)
        if name == "bfloat16":
            return mx.array(np.asarray(x, np.float32), dtype=mx.float32).astype(mx.bfloat16)
        return mx.array(x, dtype=getattr(mx, name))

    def to_float64(self, x: Any) -> NDArray[np.float64]:
        """An MLX array's values as float64 NumPy (bfloat16 via float32 in MLX: NumPy has no bfloat16
        buffer format; the widening is exact)."""
        mx = self._mx()
        if x.dtype == mx.bfloat16:
            x = x.astype(mx.float32)
        mx.eval(x)
        return np.asarray(np.array(x, copy=True), np.float64)

    @staticmethod
    def dtype_name(x: Any) -> str:
        """``mlx.core.float16`` -> ``float16``."""
        return str(x.dtype).removeprefix("mlx.core.")

    def run(
        self,
        api: Api,
        teacher: NDArray[np.generic],
        student: NDArray[np.generic],
        temperature: float,
        device: str,
        layout: str,
    ) -> dict[str, Output]:
        if layout != "contiguous":
            raise ValueError("MLX arrays have no user-visible memory layout")
        if device != "cpu":
            raise ValueError(f"the MLX adapter runs on the CPU only, not {device!r}")
        if api.entry != ENTRY:
            raise ValueError(f"unknown MLX API {api.entry!r}")
        mx, nn = self._mlx()
        t, s = self.to_mlx(teacher), self.to_mlx(student)
        out: dict[str, Output] = {}
        with mx.stream(mx.cpu):
            # a Python float is weakly typed in MLX: x / T keeps the logits' dtype (T itself is rounded to
            # it first, as in JAX: measured, x / 0.05 in float16 is x / float16(0.05))
            log_q = nn.log_softmax(s / temperature, axis=-1)
            log_p = nn.log_softmax(t / temperature, axis=-1)
            for red in api.reductions:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")  # recorded and reported by the check, not raised here
                    # looked up at call time, so a patched kl_div_loss (a mutant) is the one called
                    if red == "default":
                        res = nn.losses.kl_div_loss(log_q, log_p)
                    else:
                        res = nn.losses.kl_div_loss(log_q, log_p, reduction=red)
                    mx.eval(res)
                out[red] = Output(value=self.to_float64(res), dtype=self.dtype_name(res),
                                  warnings=tuple(str(w.message) for w in caught))  # fmt: skip
        return out
