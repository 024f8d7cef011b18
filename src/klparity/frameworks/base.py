"""The adapter contract every framework implements, and the process-wide runtime settings.

An adapter is one small class per framework. It must import its framework lazily (only inside its
methods), so that listing, collecting and skipping cost nothing when the framework is absent.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from klparity.model import Api, CompileCache, ErrorProfile, GradOutput, Output, installed

F64 = NDArray[np.float64]


@dataclass
class RuntimeSettings:
    """Per-process settings applied when a framework is first imported (set before that import)."""

    threads: int | None = None  #: intra-op thread cap; None leaves the framework's default
    extra: dict[str, object] = field(default_factory=dict)


RUNTIME = RuntimeSettings()


def cap_native_threads(threads: int) -> None:
    """Cap BLAS / OpenMP pools through the environment; only effective before those libraries load."""
    RUNTIME.threads = threads
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")


class Adapter(ABC):
    """Contract: run a KL API on given logits exactly as a distillation user would, on one device.

    ``run`` receives teacher and student logits already rounded to ``dtype`` (as NumPy arrays of that
    dtype), converts them exactly, applies the temperature and (log-)softmax *in the framework*, hands
    the result to the API in the requested memory layout, and returns every reduction's output
    widened to float64 together with the dtype it came back in and any warnings it raised.
    """

    name: ClassVar[str]  #: registry key
    #: its own rows of the error model (roundings per stage, flush-to-zero, sequential sums)
    error_profile: ClassVar[ErrorProfile] = ErrorProfile()
    #: its persistent cache of compiled kernels, where it has one (an option of the plugin)
    compile_cache: ClassVar[CompileCache | None] = None
    module: ClassVar[str]  #: importable module whose presence means "installed"
    distribution: ClassVar[str]  #: distribution whose version is reported
    extra: ClassVar[str]  #: ``pip install klparity[extra]`` installs it
    dtypes: ClassVar[tuple[str, ...]]
    #: first words of the test ids of this framework's cells, goldens and pinned facts (the xdist group)
    id_prefixes: ClassVar[tuple[str, ...]]
    #: one xdist group per dtype instead of one per framework: for a framework whose cost is per-shape
    #: compilation rather than its import, so that the workers share its tests (whichever is free
    #: takes the next piece) while the forward cells and goldens of a dtype share compiled programs
    fine_groups: ClassVar[bool] = False
    layouts: ClassVar[tuple[str, ...]] = ("contiguous",)
    #: modules whose import in a loss file names this framework (``klparity check`` infers it)
    import_names: ClassVar[tuple[str, ...]] = ()
    #: the documented difference a user's probability-space loss may show and still be right (the
    #: framework's own loss clips probabilities), or None
    user_losses_clip: ClassVar[str | None] = None
    #: (module path, abbreviation) pairs for figure labels
    short_names: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: matplotlib line style of the framework in figures
    plot_style: ClassVar[str] = "o-"
    #: (API, dtypes) the scale tier checks (``run_scale``); none by default
    scale_apis: ClassVar[tuple[tuple[Api, tuple[str, ...]], ...]] = ()
    #: arrays of the inputs' size the framework holds at its peak beyond the two inputs (scale tier's
    #: memory estimate, measured)
    scale_arrays: ClassVar[float] = 0.0

    def available(self) -> bool:
        """Installed? Checked without importing the framework."""
        return installed(self.module)

    def version(self) -> str:
        """Installed version, or ``'not installed'``."""
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    def version_label(self) -> str:
        """The version as reports and pinned-fact messages print it, e.g. ``torch 2.13.0``."""
        return f"{self.name} {self.version()}"

    def missing_reason(self) -> str:
        """Skip reason when the framework is absent, naming the extra to install."""
        return f"{self.name} is not installed: pip install 'klparity[{self.extra}]'"

    def class_sum_roundings(self, n: int) -> float:
        """Roundings (first order, relative to the sum of |terms|) of a backward kernel's sum over n
        classes; taken as pairwise unless the adapter knows its kernels: log2 n + 1."""
        return math.log2(max(n, 2)) + 1.0

    def reduction_roundings(self, reduction: str, n: int) -> float:
        """Roundings (first order, relative to the sum of |terms|) of the framework's batch reduction
        ``reduction`` over n terms; pairwise unless the adapter knows its kernel: log2 n."""
        return math.log2(n)

    @abstractmethod
    def devices(self) -> tuple[str, ...]:
        """Devices usable now, a subset of ``DEVICES`` (imports the framework)."""

    @abstractmethod
    def device_names(self) -> dict[str, str]:
        """Human-readable name per usable device, for report headers."""

    @abstractmethod
    def apis(self, dtype: str) -> tuple[Api, ...]:
        """API variants checked for inputs of ``dtype``."""

    @abstractmethod
    def compute_dtype(self, api: Api, dtype: str) -> str:
        """Dtype the API computes (and returns) in for inputs of ``dtype``."""

    @abstractmethod
    def run(
        self,
        api: Api,
        teacher: NDArray[np.generic],
        student: NDArray[np.generic],
        temperature: float,
        device: str,
        layout: str,
    ) -> dict[str, Output]:
        """Evaluate every reduction of ``api``; see the class docstring."""

    def call(self, api: Api, teacher: NDArray[np.generic], student: NDArray[np.generic], temperature: float,
             device: str, layout: str) -> dict[str, Output]:  # fmt: skip
        """``api``'s outputs: its record's own call (``Api.call``) where it has one, else ``run``."""
        if api.call is not None:
            out: dict[str, Output] = api.call(self, api, teacher, student, temperature, device, layout)
            return out
        return self.run(api, teacher, student, temperature, device, layout)

    def call_grad(self, api: Api, teacher: NDArray[np.generic], student: NDArray[np.generic], temperature: float,
                  device: str, layout: str) -> dict[str, GradOutput]:  # fmt: skip
        """``api``'s gradients: its record's own (``Api.call_grad``) where it has one, else ``run_grad``."""
        if api.call_grad is not None:
            out: dict[str, GradOutput] = api.call_grad(self, api, teacher, student, temperature, device, layout)
            return out
        return self.run_grad(api, teacher, student, temperature, device, layout)

    def run_scale(
        self, api: Api, teacher: NDArray[np.generic], student: NDArray[np.generic], temperature: float
    ) -> dict[str, Output]:
        """``run`` on contiguous CPU arrays of up to 2**28 elements, without float64 copies (scale tier)."""
        raise NotImplementedError(f"the {self.name} adapter has no scale-tier runner")

    def run_user_loss(
        self,
        call: Callable[[Any, Any, Any], Any],
        takes: str,
        teacher: NDArray[np.generic],
        student: NDArray[np.generic],
        temperature: float,
        key: Hashable = None,
    ) -> tuple[F64, F64 | None, str]:
        """Call a user's loss as a training step would: ``call(student, teacher, temperature)`` on the
        logits converted exactly (``takes``: ``logits``, or ``probs`` / ``log_probs`` of logits / T computed
        in the framework); return its value and d sum(value) / d student logits (None: no gradient
        reached them), widened to float64, and the value's dtype. ``key`` identifies the loss for any
        compilation cache. Used by ``klparity check``."""
        raise NotImplementedError(f"the {self.name} adapter does not run user losses")

    @contextlib.contextmanager
    def small_work(self) -> Iterator[None]:
        """Settings for many tiny calls (a user-loss check): by default none."""
        yield

    def run_grad(
        self,
        api: Api,
        teacher: NDArray[np.generic],
        student: NDArray[np.generic],
        temperature: float,
        device: str,
        layout: str,
    ) -> dict[str, GradOutput]:
        """Like ``run``, but return each reduction's gradients w.r.t. the teacher and student logits.

        The logits are the leaves: temperature, (log-)softmax and layout happen inside the recorded
        computation, as in a distillation step. Optional: the default raises ``NotImplementedError``
        and the gradient checks skip the framework.
        """
        raise NotImplementedError(f"the {self.name} adapter does not compute gradients yet")
