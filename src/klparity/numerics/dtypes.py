"""The floating dtypes the suite tests: their constants, and rounding float64 values to them.

bfloat16 comes from ``ml_dtypes`` (the package JAX and TensorFlow themselves use for it). The suite
rounds the float64 case data once, here, and hands the frameworks the rounded values, which they
store exactly: so the oracle and every framework see bit-identical inputs.

``round_to`` rounds the way the frameworks' own casts do (``Tensor.to``, ``tf.cast``, ``astype`` in
JAX): float64 -> float16 and float64 -> bfloat16 go through float32, two roundings to nearest even,
which differ from one correct rounding when the first lands on a tie of the narrow format
(1 + 2**-8 + 2**-30 -> 1.0 in bfloat16, not 1 + 2**-7). The two steps are written out here rather
than left to NumPy or ml_dtypes, whose float64 conversions are one correct rounding (NumPy's float16
always; ml_dtypes' bfloat16 from 0.7.0 on, through float32 before): a dependency's release must not
change the suite's data. tests/unit/test_dtypes.py compares with each installed framework's cast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import ml_dtypes
import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class DTypeInfo:
    """Constants of one floating dtype, all as Python floats."""

    name: str
    unit_roundoff: float  #: u = eps / 2, the relative error of one correctly rounded operation
    smallest_subnormal: float  #: spacing of the dtype near 0
    smallest_normal: float  #: below it, relative error bounds no longer hold
    max: float  #: largest finite value

    @property
    def numpy(self) -> np.dtype[np.generic]:
        """The NumPy (or ml_dtypes) dtype object."""
        return np.dtype(ml_dtypes.bfloat16) if self.name == "bfloat16" else np.dtype(self.name)


def _info(name: str) -> DTypeInfo:
    fi = ml_dtypes.finfo(ml_dtypes.bfloat16) if name == "bfloat16" else np.finfo(np.dtype(name))  # type: ignore[no-untyped-call]
    return DTypeInfo(
        name=name,
        unit_roundoff=float(fi.eps) / 2.0,
        smallest_subnormal=float(fi.smallest_subnormal),
        smallest_normal=float(fi.smallest_normal),
        max=float(fi.max),
    )


#: The tested dtypes, lowest precision first.
DTYPE_NAMES: Final = ("float16", "bfloat16", "float32", "float64")
DTYPES: Final[dict[str, DTypeInfo]] = {name: _info(name) for name in DTYPE_NAMES}


def dtype_info(name: str) -> DTypeInfo:
    """Look up a tested dtype by name, with a clear error for anything else."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {DTYPE_NAMES}") from None


#: Dtypes the frameworks' casts reach from float64 through float32 (see the module docstring).
VIA_FLOAT32: Final = frozenset({"float16", "bfloat16"})


def round_to(x: NDArray[np.float64], dtype: str) -> NDArray[np.generic]:
    """Round float64 values to ``dtype`` as torch, TensorFlow and JAX cast them: to nearest even, and
    through float32 for float16 and bfloat16. Returns an array of that dtype."""
    target = dtype_info(dtype).numpy
    wide = np.asarray(x, dtype=np.float64)
    if dtype in VIA_FLOAT32:
        return wide.astype(np.float32).astype(target)  # past float32's range is past the target's: inf, as before
    return wide.astype(target)


def widen(x: NDArray[np.generic]) -> NDArray[np.float64]:
    """Widen an array of any tested dtype to float64 exactly."""
    return np.asarray(x).astype(np.float64)
