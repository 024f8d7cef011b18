"""The exact float64 quantities of a case, made once per process: rounded logits, ``Exact``, overflow.

Every API of a framework, the skip check and the gradient cells judge the same case in the same dtype;
``rounded`` / ``case_exact`` keep what they make in a store bounded by bytes, read-only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Final, TypeVar

import numpy as np
from numpy.typing import NDArray

from klparity.model import Exact
from klparity.numerics import oracle
from klparity.numerics.cases import Case
from klparity.numerics.dtypes import dtype_info, round_to, widen

F64 = NDArray[np.float64]


def exact_of(teacher: F64, student: F64, temperature: float, oracle_name: str = "numpy") -> Exact:
    """Everything derived from the rounded logits; ``oracle_name`` picks the exact rows (``ORACLES``)."""
    if oracle_name not in ORACLES:
        raise ValueError(f"unknown oracle {oracle_name!r}; expected one of {', '.join(ORACLES)}")
    with np.errstate(invalid="ignore"):
        zt, zs = teacher / temperature, student / temperature
    lp, lq = oracle.log_softmax(teacher, temperature), oracle.log_softmax(student, temperature)
    return Exact(
        teacher, student, temperature, zt, zs, lp, lq, np.exp(lp), np.exp(lq),
        oracle.kl_from_logits(teacher, student, temperature) if oracle_name == "numpy"
        else scipy_rows(teacher, student, temperature),
    )  # fmt: skip


_V = TypeVar("_V")


class _Kept:
    """Least-recently-used store of read-only arrays, bounded by their bytes.

    Every API of a framework, the skip check and the gradient cells judge the same case in the same
    dtype: the rounded logits and their exact quantities are made once per process, not once per
    cell. Values are read-only, so no caller can change what the next one reads.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._items: OrderedDict[tuple[object, ...], tuple[Any, int]] = OrderedDict()

    def get(self, key: tuple[object, ...], make: Callable[[], tuple[_V, list[NDArray[Any]]]]) -> _V:
        """The value kept under ``key``, else ``make()``'s value (its arrays made read-only), kept if it fits."""
        if key in self._items:
            self._items.move_to_end(key)
            value: _V = self._items[key][0]
            return value
        value, arrays = make()
        size = 64  # the entry itself, so that entries without arrays are bounded too
        for a in arrays:
            a.flags.writeable = False
            size += a.nbytes
        if size <= self.limit:
            self._items[key] = (value, size)
            self.used += size
            while self.used > self.limit:
                _, (_, freed) = self._items.popitem(last=False)
                self.used -= freed
        return value


#: the quick tier's cases in one dtype take ~26 MiB of exact quantities; the full tier's do not fit
_KEPT = _Kept(64 << 20)


def rounded(case: Case, shift: int, dtype: str) -> tuple[NDArray[np.generic], NDArray[np.generic]]:
    """The case's (teacher, student) logits rounded to ``dtype``: what a framework receives (read-only)."""

    def make() -> tuple[tuple[NDArray[np.generic], NDArray[np.generic]], list[NDArray[Any]]]:
        t64, s64 = case.logits(shift)
        t_r, s_r = round_to(t64, dtype), round_to(s64, dtype)
        return (t_r, s_r), [t_r, s_r]

    return _KEPT.get(("rounded", case, shift, dtype), make)


def case_overflow(case: Case, shift: int, dtype: str) -> str | None:
    """``overflow_reason`` of the case's logits rounded to ``dtype`` (kept: every API's cell asks)."""

    def make() -> tuple[str | None, list[NDArray[Any]]]:
        t_r, s_r = rounded(case, shift, dtype)
        return overflow_reason(widen(t_r), widen(s_r), case.temperature, dtype), []

    return _KEPT.get(("overflow", case, shift, dtype), make)


def case_exact(case: Case, shift: int, dtype: str, oracle_name: str = "numpy") -> Exact:
    """``Exact.of`` the case's logits rounded to ``dtype`` (read-only arrays)."""

    def make() -> tuple[Exact, list[NDArray[Any]]]:
        t_r, s_r = rounded(case, shift, dtype)
        ex = exact_of(widen(t_r), widen(s_r), case.temperature, oracle_name)
        return ex, [getattr(ex, f.name) for f in fields(ex) if isinstance(getattr(ex, f.name), np.ndarray)]

    return _KEPT.get(("exact", case, shift, dtype, oracle_name), make)


#: Exact per-row KL: ``numpy`` is ``oracle.kl_from_logits`` (log space, phi-form sum); ``scipy`` is
#: the cross-oracle ``scipy_rows`` (``--klparity-oracle``), an independent second implementation.
ORACLES: Final = ("numpy", "scipy")


def scipy_rows(teacher: F64, student: F64, temperature: float) -> F64:
    """Per-row ``sum(scipy.special.rel_entr(p, q), axis=-1)``, p and q the float64 softmax of the logits.

    In probability space: a class whose float64 probability underflows to 0 while its log-probability
    is finite is lost (and gives +inf against a teacher with mass there), unlike ``kl_from_logits``.
    """
    import scipy.special  # lazily: SciPy belongs to the test extra, not to the package's dependencies

    p, q = oracle.softmax(teacher, temperature), oracle.softmax(student, temperature)
    return np.asarray(np.sum(scipy.special.rel_entr(p, q), axis=-1), dtype=np.float64)


def overflow_reason(teacher: F64, student: F64, temperature: float, dtype: str) -> str | None:
    """Why a case is meaningless in ``dtype`` (logits / T or their spread overflow), else None."""
    with np.errstate(invalid="ignore", over="ignore"):
        both = np.concatenate([teacher.ravel(), student.ravel()]) / temperature
    finite = both[np.isfinite(both)]
    biggest = float(np.max(np.abs(finite))) if finite.size else 0.0
    if 2.0 * biggest >= dtype_info(dtype).max:
        return f"|logits / T| up to {biggest:.3g} overflows {dtype} (max {dtype_info(dtype).max:.3g})"
    return None
