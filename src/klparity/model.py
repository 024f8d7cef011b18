"""Plain data shared by every layer: what an API is, what it returned, what it must return, a verdict.

The bottom layer: nothing here imports another klparity module or a framework. ``Api`` names one way
of calling a KL loss, ``Output`` / ``GradOutput`` what a framework returned (widened to float64),
``Exact`` the float64 quantities of one case, ``Expectation`` / ``GoldenExpected`` what a reduction must
return and how close, ``CheckResult`` one verdict, ``Fact`` / ``Measured`` a pinned behaviour and
``Mutant`` an injectable regression.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

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
    #: the record's own call, for an API its record calls rather than its adapter:
    #: ``call(adapter, api, teacher, student, temperature, device, layout) -> {reduction: Output}``;
    #: ``call_grad`` likewise with ``{reduction: GradOutput}``. Not part of the API's identity.
    call: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    call_grad: Callable[..., Any] | None = field(default=None, compare=False, repr=False)

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


@functools.cache
def installed(module: str) -> bool:
    """``module`` can be imported (found once per process: every cell of a framework asks, and a
    search of ``sys.path`` for a module not yet imported costs ~0.1 ms)."""
    return importlib.util.find_spec(module) is not None


@dataclass
class CheckResult:
    """The verdict on one reduction of one cell, JSON-serialisable via ``to_dict``."""

    framework: str
    api: str
    reduction: str
    dtype: str
    device: str
    layout: str
    case: str
    seed: int
    ok: bool = True
    max_abs: float = 0.0
    max_rel: float = 0.0
    tightness: float = 0.0  #: max over entries of |error| / tolerance
    tolerance: float = 0.0  #: largest tolerance over entries
    exact_gap: float = 0.0  #: |API formula - exact KL|, max over entries (a documented difference)
    problems: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    reason: str = ""

    def fail(self, message: str) -> None:
        """Record a problem; the check fails."""
        self.ok = False
        self.problems.append(message)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with JSON-safe floats (inf/nan as strings)."""
        d: dict[str, Any] = {}
        for f in fields(self):  # shallow: asdict's deep copies cost more than the check itself
            v = getattr(self, f.name)
            if isinstance(v, list):
                v = list(v)
            elif isinstance(v, float) and not math.isfinite(v):
                v = str(v)
            d[f.name] = v
        return d


@dataclass(frozen=True)
class Exact:
    """Float64 quantities derived from the rounded logits of one case."""

    teacher: F64
    student: F64
    temperature: float
    zt: F64
    zs: F64
    lp: F64
    lq: F64
    p: F64
    q: F64
    rows: F64  #: exact per-row KL


@dataclass(frozen=True)
class Expectation:
    """What one reduction of an API must return, how close, and what the exact KL says."""

    value: F64
    tolerance: F64 | float
    exact: F64
    gap_bound: F64 | float | None  #: derived bound on |value - exact|, or None (must be equal)
    dtype: str
    must_warn: str | None
    #: rows where +inf is accepted too: whether an underflow happens there is within rounding error
    inf_allowed: NDArray[np.bool_] | None = None
    #: entries where NaN is accepted too (an underflow to 0 meeting -inf, within rounding error)
    nan_allowed: NDArray[np.bool_] | None = None


@dataclass
class GoldenExpected:
    """Reference rows for one API on one golden (``klparity.numerics.goldens``), what differs from it and why."""

    rows: F64
    tol_rows: F64
    total: float  #: sum of the expected rows (the golden's kl_sum where every row is the golden's)
    tol_total: float
    notes: list[str]
    problems: list[str] = field(default_factory=list)  #: failures found while deriving
    #: rows that may be +inf instead (the value depends on whether the backend flushes subnormals)
    either_inf: NDArray[np.bool_] | None = None


#: A pinned value: plain data (str, bool, float, or a dict of them) that compares with ``==``.
Value = Any


@dataclass(frozen=True)
class Measured:
    """What a probe saw: ``value`` is compared with the pinned one; ``detail`` holds the numbers."""

    value: Value
    detail: str


@dataclass(frozen=True)
class Fact:
    """One pinned behaviour of one framework."""

    name: str
    framework: str  #: registry name
    statement: str
    reason: str
    pinned: Value
    probe: Callable[[], Measured]
    #: (module, extra) of a library the fact needs beyond its framework, or ("", "")
    requires: tuple[str, str] = ("", "")


Patch = Callable[[Any], Any]  # receives the original function, returns the replacement


@dataclass(frozen=True)
class Mutant:
    """One injected regression: where it is patched and the real bug it imitates."""

    name: str
    framework: str
    description: str
    targets: tuple[tuple[str, str], ...]  #: (module, attribute) pairs replaced by ``wrap(original)``
    wrap: Patch


@dataclass(frozen=True)
class GoldenGradient:
    """An API's gradient on a golden case, to be judged against the golden's (mpmath) gradient."""

    framework: str
    api: str  #: the id of the API's row in the report
    label: str  #: which gradient, e.g. ``d/d student``
    observed: F64  #: the framework's gradient, widened
    tolerance: F64  #: per entry, from the gradient error model
    dtype: str  #: the dtype the gradient came back in
    expected_dtype: str


@dataclass(frozen=True)
class Row:
    """One row of the tolerance table: rounding counts for one (framework, dtype)."""

    c_in: float  #: roundings per log-probability in the softmax stage, relative to e_j
    c_kernel: float  #: roundings per element in the loss kernel, relative to e_j
    accumulate: str  #: dtype the framework sums in
    reason: str


@dataclass(frozen=True)
class ErrorProfile:
    """A framework's own rows of the error model (``klparity.numerics.errormodel``), declared by its adapter.

    ``rows`` / ``grad_rows`` override the framework-independent rows per input dtype; ``flush_to_zero``:
    dtypes whose CPU kernels flush subnormal results to zero; ``sequential_sums``: dtypes whose
    reductions add one term at a time; ``class_sum_roundings``: roundings of a backward kernel's sum
    over n classes (None: pairwise, log2 n + 1).
    """

    rows: Mapping[str, Row] = field(default_factory=dict)
    grad_rows: Mapping[str, Row] = field(default_factory=dict)
    flush_to_zero: frozenset[str] = frozenset()
    sequential_sums: frozenset[str] = frozenset()
    class_sum_roundings: Callable[[int], float] | None = None


@dataclass(frozen=True)
class CompileCache:
    """A framework's persistent cache of compiled kernels, offered by the plugin as ``--klparity-<option>``.

    The plugin puts the chosen directory in the environment variable ``env`` before the framework is
    first imported; the adapter reads it when it imports its framework.
    """

    option: str  #: the option's name after ``--klparity-``, e.g. ``jax-cache``
    env: str  #: the environment variable the adapter reads
    dirname: str  #: the default directory's name in pytest's cache directory
    help: str  #: what the cache is, for the option's help
