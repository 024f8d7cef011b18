"""Tests of ``klparity.dtypes``: dtype constants, and rounding float64 values to the tested dtypes.

Expected values are derived by hand from each format's significand width (float16: 11 bits,
bfloat16: 8, float32: 24, float64: 53), not read back from NumPy's or ml_dtypes' ``finfo``.
"""

from __future__ import annotations

import math
import zlib

import ml_dtypes
import numpy as np
import pytest

from klparity import dtypes

#: significand bits p (implicit bit included): unit roundoff 2**-p, eps 2**(1-p)
PRECISION = {"float16": 11, "bfloat16": 8, "float32": 24, "float64": 53}
NUMPY_TYPE = {
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "float32": np.float32,
    "float64": np.float64,
}


def _rng(test_id: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(test_id.encode("utf-8")))


def test_dtype_names_lowest_precision_first() -> None:
    assert dtypes.DTYPE_NAMES == ("float16", "bfloat16", "float32", "float64")
    assert list(dtypes.DTYPES) == list(dtypes.DTYPE_NAMES)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("float16", 2.0**-11), ("bfloat16", 2.0**-8), ("float32", 2.0**-24), ("float64", 2.0**-53)],
)
def test_unit_roundoff(name: str, expected: float) -> None:
    info = dtypes.dtype_info(name)
    assert info.unit_roundoff == expected
    assert type(info.unit_roundoff) is float


@pytest.mark.parametrize(
    ("name", "smallest_subnormal", "smallest_normal", "max_"),
    [
        ("float16", 2.0**-24, 2.0**-14, (2 - 2.0**-10) * 2.0**15),
        ("bfloat16", 2.0**-133, 2.0**-126, (2 - 2.0**-7) * 2.0**127),
        ("float32", 2.0**-149, 2.0**-126, (2 - 2.0**-23) * 2.0**127),
        ("float64", 2.0**-1074, 2.0**-1022, (2 - 2.0**-52) * 2.0**1023),
    ],
)
def test_dtype_range_constants(
    name: str, smallest_subnormal: float, smallest_normal: float, max_: float
) -> None:
    info = dtypes.dtype_info(name)
    assert info.name == name
    assert info.smallest_subnormal == smallest_subnormal
    assert info.smallest_normal == smallest_normal
    assert info.max == max_
    assert info.numpy == np.dtype(NUMPY_TYPE[name])


def test_float16_max_is_65504() -> None:
    assert dtypes.dtype_info("float16").max == 65504.0


@pytest.mark.parametrize("name", ["float8", "half", "bf16", "float128", "Float32", "", "int8"])
def test_unknown_dtype_is_refused_with_the_list_of_known_ones(name: str) -> None:
    with pytest.raises(
        ValueError, match=r"unknown dtype .*expected one of .*float16.*bfloat16.*float32.*float64"
    ):
        dtypes.dtype_info(name)
    with pytest.raises(ValueError, match="unknown dtype"):
        dtypes.round_to(np.array([1.0]), name)


@pytest.mark.parametrize("name", dtypes.DTYPE_NAMES)
def test_round_to_returns_the_dtype_and_widen_returns_float64(name: str) -> None:
    x = np.array([[0.1, -2.5], [3.0, 1e-3]])
    rounded = dtypes.round_to(x, name)
    assert rounded.dtype == np.dtype(NUMPY_TYPE[name])
    assert rounded.shape == (2, 2)
    wide = dtypes.widen(rounded)
    assert wide.dtype == np.float64
    assert wide.shape == (2, 2)


@pytest.mark.parametrize("name", dtypes.DTYPE_NAMES)
def test_round_trip_of_representable_values_is_exact(name: str) -> None:
    """Values already on the dtype's grid survive float64 -> dtype -> float64 bit for bit."""
    p = PRECISION[name]
    rng = _rng(f"test_dtypes.round_trip.{name}")
    # random p-bit significands times powers of two inside the normal range of every dtype
    significands = rng.integers(2 ** (p - 1), 2**p, 1000, dtype=np.uint64).astype(np.float64)
    exponents = rng.integers(-14, 15, 1000)
    signs = rng.choice([-1.0, 1.0], 1000)
    x = signs * np.ldexp(significands / 2.0 ** (p - 1), exponents)
    x = np.concatenate([x, [0.0, -0.0, math.inf, -math.inf, dtypes.dtype_info(name).max]])
    wide = dtypes.widen(dtypes.round_to(x, name))
    assert wide.tobytes() == x.tobytes()  # -0.0 keeps its sign too
    # and narrow -> wide -> narrow is the identity on the dtype's own values
    narrow = dtypes.round_to(x, name)
    assert dtypes.round_to(dtypes.widen(narrow), name).tobytes() == narrow.tobytes()


@pytest.mark.parametrize("name", dtypes.DTYPE_NAMES)
def test_round_to_nan_stays_nan(name: str) -> None:
    assert np.isnan(dtypes.widen(dtypes.round_to(np.array([np.nan]), name))).all()


@pytest.mark.parametrize("name", dtypes.DTYPE_NAMES)
def test_rounding_error_is_within_unit_roundoff(name: str) -> None:
    rng = _rng(f"test_dtypes.roundoff.{name}")
    # magnitudes in [2**-14, 2**15): inside the normal range of every dtype, float16's included
    x = rng.choice([-1.0, 1.0], 2000) * (1.0 + rng.random(2000)) * np.exp2(rng.integers(-14, 15, 2000))
    wide = dtypes.widen(dtypes.round_to(x, name))
    rel = np.abs(wide - x) / np.abs(x)
    u = 2.0 ** -PRECISION[name]
    assert np.all(rel <= u)
    if name != "float64":
        assert rel.max() > u / 4  # something was actually rounded


@pytest.mark.parametrize(("name", "p"), [("float16", 11), ("bfloat16", 8), ("float32", 24)])
def test_round_to_nearest_ties_to_even(name: str, p: int) -> None:
    """Around 1 the spacing is 2**(1-p): halfway points go to the even neighbour, others to nearest."""
    ulp = 2.0 ** (1 - p)
    x = np.array([1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 4, 1 + 3 * ulp / 4, -(1 + ulp / 2), 2 - ulp / 4])
    expected = np.array([1.0, 1 + 2 * ulp, 1.0, 1 + ulp, -1.0, 2.0])
    np.testing.assert_array_equal(dtypes.widen(dtypes.round_to(x, name)), expected)


def test_float16_rounds_float64_directly() -> None:
    """float64 -> float16 is one correctly rounded step: just above a float16 tie rounds up.

    (torch, JAX and TensorFlow cast float64 -> float16 through float32, which lands on the tie and
    rounds to even instead; the suite must hand frameworks ``round_to`` output, never let them cast.)
    """
    x = np.array([1 + 2.0**-11 + 2.0**-40])
    assert dtypes.widen(dtypes.round_to(x, "float16")).tolist() == [1 + 2.0**-10]


def test_bfloat16_rounds_float64_through_float32() -> None:
    """ml_dtypes casts float64 -> bfloat16 via float32 (as torch, JAX and TensorFlow do too): the
    first rounding lands exactly on a bfloat16 tie, the second rounds it to even. Correct rounding in
    one step would give 1 + 2**-7. Pinned so a change in ml_dtypes is noticed."""
    x = np.array([1 + 2.0**-8 + 2.0**-30])
    assert dtypes.widen(dtypes.round_to(x, "bfloat16")).tolist() == [1.0]
    via_float32 = x.astype(np.float32).astype(ml_dtypes.bfloat16)
    assert dtypes.round_to(x, "bfloat16").tobytes() == via_float32.tobytes()


def test_bfloat16_is_the_top_half_of_float32() -> None:
    """bfloat16 bits are the high 16 bits of float32's; on float32 values rounding is RNE on bits."""
    rng = _rng("test_dtypes.bf16_bits")
    x32 = (rng.normal(0.0, 1.0, 5000) * np.exp2(rng.integers(-30, 30, 5000))).astype(np.float32)
    bits = x32.view(np.uint32).astype(np.uint64)
    lower = bits & 0xFFFF
    upper = bits >> 16
    round_up = (lower > 0x8000) | ((lower == 0x8000) & ((upper & 1) == 1))
    expected_bits = (upper + round_up).astype(np.uint16)
    got = dtypes.round_to(x32.astype(np.float64), "bfloat16")
    np.testing.assert_array_equal(got.view(np.uint16), expected_bits)
    assert np.any(lower == 0x8000) or np.any(round_up)  # the rounding branch is exercised


@pytest.mark.parametrize(("name", "p"), [("float16", 11), ("bfloat16", 8), ("float32", 24)])
def test_overflow_and_underflow(name: str, p: int) -> None:
    info = dtypes.dtype_info(name)
    with np.errstate(over="ignore"):
        big = dtypes.widen(dtypes.round_to(np.array([info.max * 2, -info.max * 2]), name))
    assert big.tolist() == [math.inf, -math.inf]
    tiny = dtypes.widen(dtypes.round_to(np.array([info.smallest_subnormal / 4]), name))
    assert tiny.tolist() == [0.0]
    sub = dtypes.widen(dtypes.round_to(np.array([info.smallest_subnormal * 3]), name))
    assert sub.tolist() == [info.smallest_subnormal * 3]


def test_widen_is_exact_for_every_float16_value() -> None:
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every[np.isfinite(every)]
    wide = dtypes.widen(finite)
    assert wide.dtype == np.float64
    assert np.array_equal(wide.astype(np.float16).view(np.uint16), finite.view(np.uint16))
    assert len(np.unique(wide[wide != 0])) == len(finite) - 2  # +0 and -0 aside, all distinct
