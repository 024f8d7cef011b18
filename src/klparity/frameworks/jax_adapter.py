"""JAX adapter: optax's ``kl_divergence`` / ``kl_divergence_with_log_targets``, ``jax.scipy.special.rel_entr``.

The student goes in as ``jax.nn.log_softmax(s / T)``; the target as ``jax.nn.softmax(t / T)``
(``kl_divergence``), ``jax.nn.log_softmax(t / T)`` (``kl_divergence_with_log_targets``), or both as
``jax.nn.softmax`` probabilities summed over the class axis (``rel_entr``), all computed by JAX in
the tested dtype on the tested device, under ``jax.jit`` as a training step runs them: one program
computes all three (one compilation per shape and dtype: the temperature is a traced argument), and
each cell keeps its API's output. None of them reduces over the batch: the single reduction label
``"none"`` means one value per row.

float64 exists in JAX only with ``jax_enable_x64``; without it ``jnp.asarray`` silently truncates
float64 to float32. The adapter enables it with the thread-local ``jax.enable_x64(True)`` context
manager around float64 cells only, so the process-wide default (float32) is never changed.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from types import ModuleType
from typing import Any, ClassVar, Final

import numpy as np
from numpy.typing import NDArray

from klparity.frameworks.base import Adapter
from klparity.model import Api, CompileCache, ErrorProfile, Output, Row, installed

KL: Final = "optax.losses.kl_divergence"
KL_LOG_TARGETS: Final = "optax.losses.kl_divergence_with_log_targets"
REL_ENTR: Final = "jax.scipy.special.rel_entr"
ENTRIES: Final = (KL, KL_LOG_TARGETS, REL_ENTR)
ALL: Final = "all"  #: key of the program that computes every entry at once
REDUCTIONS: Final = ("none",)  #: per-row values; none of the APIs reduces over the batch
#: environment variable naming JAX's persistent compilation cache directory (set by the pytest plugin)
JAX_CACHE_ENV: Final = "KLPARITY_JAX_CACHE"


class JaxAdapter(Adapter):
    """optax's two KL losses and ``sum(jax.scipy.special.rel_entr(p, q), axis=-1)``, per row."""

    #: JAX compiles ~200 small kernels per cold run; a warm persistent cache compiles none
    compile_cache: ClassVar[CompileCache | None] = CompileCache(
        "jax-cache", JAX_CACHE_ENV, "klparity-jax", "JAX's persistent compilation cache")
    #: Its own rows of the error model (``klparity.numerics.errormodel``).
    error_profile: ClassVar[ErrorProfile] = ErrorProfile(
        rows={
            "float16": Row(2, 3, "float32", "jax.nn and the losses round each elementwise op to float16; "
                           "jnp.sum (log-sum-exp and the class sum) upcasts float16 to float32 "
                           "(upcast_f16_for_computation) and rounds the sum once"),
            "bfloat16": Row(2, 3, "float32", "as float16: bfloat16 elementwise, float32 sums"),
        },
    )

    name = "jax"
    module = "jax"
    distribution = "jax"
    extra = "jax"
    id_prefixes = ("jax", "optax")
    import_names = ("jax", "optax", "flax")
    short_names = (("optax.losses.", "optax."),)
    plot_style = "^:"
    fine_groups = True  # cost is ~35 ms per program (shape, dtype) with a warm cache; the import ~0.6 s
    dtypes = ("float16", "bfloat16", "float32", "float64")
    _mods: tuple[ModuleType, ModuleType] | None = None
    _losses: ClassVar[dict[str, Callable[[Any, Any, float], Any]]] = {}

    def available(self) -> bool:
        """JAX and optax both installed (the ``jax`` extra installs both)."""
        return installed("jax") and installed("optax")

    def version(self) -> str:
        v = super().version()
        try:
            return f"{v} (optax {importlib.metadata.version('optax')})"
        except importlib.metadata.PackageNotFoundError:
            return v

    def _jax(self) -> tuple[ModuleType, ModuleType]:
        # No thread cap here: XLA's CPU client has no supported setting for it (an XLA_FLAGS entry
        # that a later jaxlib drops aborts the process), and the cases are small.
        if JaxAdapter._mods is None:
            import jax
            import optax

            cache = os.environ.get(JAX_CACHE_ENV)
            if cache:  # every kernel, however quick to compile: the suite compiles ~200 small ones
                config: Any = jax.config
                config.update("jax_compilation_cache_dir", cache)
                config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
                config.update("jax_persistent_cache_min_entry_size_bytes", 0)
            JaxAdapter._mods = (jax, optax)
        return JaxAdapter._mods

    def _device(self, device: str) -> Any:
        jax, _ = self._jax()
        return jax.devices("gpu" if device == "gpu" else "cpu")[0]

    def devices(self) -> tuple[str, ...]:
        jax, _ = self._jax()
        try:
            jax.devices("gpu")
        except RuntimeError:  # "Unknown backend: 'gpu' requested ...": no GPU backend installed
            return ("cpu",)
        return ("cpu", "gpu")

    def device_names(self) -> dict[str, str]:
        names = {"cpu": "cpu (XLA)"}
        if "gpu" in self.devices():
            names["gpu"] = str(self._device("gpu").device_kind)
        return names

    def apis(self, dtype: str) -> tuple[Api, ...]:
        return (
            Api(self.name, KL, "optax", REDUCTIONS),
            Api(self.name, KL_LOG_TARGETS, "optax", REDUCTIONS),
            Api(self.name, REL_ENTR, "optax", REDUCTIONS, (("sum_axis", -1),)),
        )

    def compute_dtype(self, api: Api, dtype: str) -> str:
        return dtype  # float64 only because run() enables x64 for it

    def _expression(self, entry: str) -> Callable[[Any, Any, float], Any]:
        """The loss of one API as a distillation training step writes it (traced, not yet jitted).

        ``temperature`` is a traced Python float, hence weakly typed: ``x / T`` keeps the logits' dtype,
        and one compilation serves every temperature of a shape and dtype.
        """
        if entry not in ENTRIES:
            raise ValueError(f"unknown JAX API {entry!r}")
        jax, optax = self._jax()
        jnp, nn = jax.numpy, jax.nn

        def loss(t: Any, s: Any, temperature: float) -> Any:
            log_q = nn.log_softmax(s / temperature, axis=-1)
            if entry == KL:
                return optax.losses.kl_divergence(log_q, nn.softmax(t / temperature, axis=-1))
            if entry == KL_LOG_TARGETS:
                log_p = nn.log_softmax(t / temperature, axis=-1)
                return optax.losses.kl_divergence_with_log_targets(log_q, log_p)
            p, q = nn.softmax(t / temperature, axis=-1), nn.softmax(s / temperature, axis=-1)
            return jnp.sum(jax.scipy.special.rel_entr(p, q), axis=-1)

        return loss

    def _loss(self, entry: str) -> Callable[[Any, Any, float], Any]:
        """One jitted program: ``entry``'s loss alone, or (``entry == ALL``) the tuple of all three.

        Cells call the ``ALL`` program and keep their API's output: tracing, lowering and compiling
        per shape and dtype dominate the JAX cells' cost, and one program instead of three took 0.48 s
        instead of 0.82 s for twelve shapes with a warm cache, 2.0 s instead of 3.8 s with a cold
        one. Each output is its API's own expression; XLA may share the common
        subexpressions (``s / T``, the student's log-softmax), as it does in any training step that
        computes more than a loss.
        """
        if entry not in JaxAdapter._losses:
            jax, _ = self._jax()
            if entry == ALL:
                parts = [self._expression(e) for e in ENTRIES]

                def every(t: Any, s: Any, temperature: float) -> tuple[Any, ...]:
                    return tuple(f(t, s, temperature) for f in parts)

                JaxAdapter._losses[entry] = jax.jit(every)
            else:
                JaxAdapter._losses[entry] = jax.jit(self._expression(entry))
        return JaxAdapter._losses[entry]

    def _evaluate(self, entry: str, t: Any, s: Any, temperature: float) -> Any:
        """``entry``'s per-row loss, from the all-APIs program; from its own program where that one fails.

        An upgrade that breaks one API (renamed, or failing to trace) must fail that API's cells only,
        with its own error: the single-API program raises it.
        """
        try:
            out = self._loss(ALL)(t, s, temperature)
        except Exception:  # any error: attributed below, by the failing API's own program
            return self._loss(entry)(t, s, temperature)
        return out[ENTRIES.index(entry)]

    @staticmethod
    def x64(jax: ModuleType, dtype: str) -> AbstractContextManager[Any]:
        """``jax.enable_x64(True)`` for float64 (thread-local, undone on exit), else nothing."""
        return jax.enable_x64(True) if dtype == "float64" else nullcontext()

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
            raise ValueError("JAX arrays have no user-visible memory layout")
        jax, _ = self._jax()
        dtype = str(teacher.dtype)
        with self.x64(jax, dtype), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # recorded and reported by the check, not raised here
            dev = self._device(device)
            # The NumPy arrays already hold dtype (bfloat16 via ml_dtypes, which JAX uses too). Without
            # x64, device_put would silently make float64 float32: the result dtype check catches that.
            t, s = jax.device_put(teacher, dev), jax.device_put(student, dev)
            res = self._evaluate(api.entry, t, s, temperature)
            value = np.asarray(res).astype(np.float64)
            res_dtype = str(res.dtype)
        return {"none": Output(value=value, dtype=res_dtype, warnings=tuple(str(w.message) for w in caught))}

    def _user_step(self, call: Callable[[Any, Any, Any], Any], takes: str, jit: bool) -> Callable[..., Any]:
        """(value, d sum(value) / d student) of a user's loss, as one function of (student, teacher, T)."""
        jax, _ = self._jax()

        def step(ss: Any, tt: Any, temperature: Any) -> tuple[Any, Any]:
            def loss(ss: Any) -> Any:
                fs, ft = ss, tt
                if takes == "probs":
                    fs, ft = jax.nn.softmax(ss / temperature, axis=-1), jax.nn.softmax(tt / temperature, axis=-1)
                elif takes == "log_probs":
                    fs = jax.nn.log_softmax(ss / temperature, axis=-1)
                    ft = jax.nn.log_softmax(tt / temperature, axis=-1)
                return call(fs, ft, temperature)

            out, vjp = jax.vjp(loss, ss)
            (g,) = vjp(jax.numpy.ones_like(out))
            return out, g

        return jax.jit(step) if jit else step

    def run_user_loss(
        self,
        call: Callable[[Any, Any, Any], Any],
        takes: str,
        teacher: NDArray[np.generic],
        student: NDArray[np.generic],
        temperature: float,
        key: Hashable = None,
    ) -> tuple[NDArray[np.float64], NDArray[np.float64] | None, str]:
        """Jitted as a training step is, the temperature traced (one compilation per shape and dtype, kept for
        the loss ``key``); a loss that needs a concrete temperature (Python control flow on it) runs eagerly."""
        jax, _ = self._jax()
        with jax.enable_x64(str(teacher.dtype) == "float64"):
            tt, ss = jax.numpy.asarray(teacher), jax.numpy.asarray(student)
            cache_key = (key if key is not None else call, takes)
            if cache_key not in _USER_STEPS:
                _USER_STEPS.clear()  # one loss at a time: do not keep compiled user code alive
                _USER_STEPS[cache_key] = self._user_step(call, takes, jit=True)
            try:
                out, g = _USER_STEPS[cache_key](ss, tt, temperature)
            except jax.errors.ConcretizationTypeError:  # also TracerBoolConversionError
                out, g = self._user_step(call, takes, jit=False)(ss, tt, temperature)
            return np.asarray(out).astype(np.float64), np.asarray(g).astype(np.float64), str(out.dtype)


#: the jitted step of the user loss being checked (``JaxAdapter.run_user_loss``)
_USER_STEPS: dict[Hashable, Callable[..., Any]] = {}
