"""The adapter contract every framework implements, and the process-wide runtime settings.

An adapter is one small class per framework. It must import its framework lazily (only inside its
methods), so that listing, collecting and skipping cost nothing when the framework is absent.
"""

from __future__ import annotations

import contextlib
import functools
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

F64 = NDArray[np.float64]
DEVICES = ("cpu", "gpu")
LAYOUTS = ("contiguous", "transposed", "strided")


@dataclass(frozen=True)
class Api:
    """One way of calling a KL loss: entry point plus fixed options, checked under several reductions.

    ``reductions`` holds the reduction labels the adapter evaluates per call (``"default"`` means the
    constructor/function default, whatever it is: the oracle pins what it must be).
    """

    framework: str
    entry: str  #: e.g. ``torch.nn.KLDivLoss``
    semantics: str  #: the key of its spec in ``klparity.apis.SPECS``
    reductions: tuple[str, ...]
    options: tuple[tuple[str, object], ...] = ()
    #: (module, extra) of a library the API needs beyond its framework (its cells skip, naming the extra,
    #: where the module is absent); ("", "") for the framework's own APIs
    requires: tuple[str, str] = ("", "")

    @property
    def id(self) -> str:
        """Stable printable id, e.g. ``torch.nn.functional.kl_div(log_target=True)``."""
        return f"{self.entry}({', '.join(f'{k}={v}' for k, v in self.options)})"

    def missing(self) -> str | None:
        """Why the API cannot run here (its library is not installed), or None."""
        module, extra = self.requires
        if module and not installed(module):
            return f"{module} is not installed: pip install 'klparity[{extra}]'"
        return None

    def option(self, key: str, default: object = None) -> object:
        """Value of a fixed option, or ``default``."""
        return dict(self.options).get(key, default)


@dataclass(frozen=True)
class Output:
    """One framework result, widened to float64, with the dtype it came back in."""

    value: F64
    dtype: str
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class GradOutput:
    """Gradients of one reduction of a KL API with respect to the logits, widened to float64.

    ``student`` / ``teacher`` are d(loss)/d(student logits) and d(loss)/d(teacher logits) (``teacher``
    is None where the API stops gradients to its target); an unreduced loss is differentiated as its
    sum. ``seen_target`` / ``seen_input`` are the two arguments exactly as the API received them
    (torch: target and input; Keras: y_true and y_pred), widened: the discrete decisions of the API's
    formula (a zero target, Keras's clip) are judged on these, the values on the exact inputs.
    """

    student: F64
    teacher: F64 | None
    dtype: str  #: dtype of the student gradient (the logits' dtype)
    seen_target: F64
    seen_input: F64
    warnings: tuple[str, ...] = ()


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


@functools.cache
def installed(module: str) -> bool:
    """``module`` can be imported (found once per process: every cell of a framework asks, and a
    search of ``sys.path`` for a module not yet imported costs ~0.1 ms)."""
    return importlib.util.find_spec(module) is not None


class Adapter(ABC):
    """Contract: run a KL API on given logits exactly as a distillation user would, on one device.

    ``run`` receives teacher and student logits already rounded to ``dtype`` (as NumPy arrays of that
    dtype), converts them exactly, applies the temperature and (log-)softmax *in the framework*, hands
    the result to the API in the requested memory layout, and returns every reduction's output
    widened to float64 together with the dtype it came back in and any warnings it raised.
    """

    name: ClassVar[str]  #: registry key
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
