"""Tests of ``klparity.numerics.dtypes``: dtype constants, and rounding float64 values to the tested dtypes.

Expected values are derived by hand from each format's significand width (float16: 11 bits,
bfloat16: 8, float32: 24, float64: 53), not read back from NumPy's or ml_dtypes' ``finfo``.
"""

from __future__ import annotations

import math
import zlib

import ml_dtypes
import numpy as np
import pytest

from klparity.numerics import dtypes

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


#: float64 values just above a tie of the narrow format: one correct rounding goes up, the frameworks'
#: two roundings (float64 -> float32 lands exactly on the tie) go to the even neighbour.
#: (format, value, frameworks' result, one-step result), all derived from the significand widths.
DOUBLE_ROUNDING = [
    ("bfloat16", 1 + 2.0**-8 + 2.0**-30, 1.0, 1 + 2.0**-7),
    ("bfloat16", -(1 + 2.0**-8 + 2.0**-30), -1.0, -(1 + 2.0**-7)),
    ("bfloat16", 2.5 * 2.0**-133 + 2.0**-170, 2 * 2.0**-133, 3 * 2.0**-133),  # subnormal: 2.5 units -> 2
    ("float16", 1 + 2.0**-11 + 2.0**-40, 1.0, 1 + 2.0**-10),
    ("float16", -(1 + 2.0**-11 + 2.0**-40), -1.0, -(1 + 2.0**-10)),
    ("float16", 2.5 * 2.0**-24 + 2.0**-60, 2 * 2.0**-24, 3 * 2.0**-24),  # subnormal: 2.5 units -> 2
]


@pytest.mark.parametrize(("name", "x", "frameworks", "one_step"), DOUBLE_ROUNDING)
def test_round_to_goes_through_float32_like_the_frameworks(
    name: str, x: float, frameworks: float, one_step: float
) -> None:
    """The suite's data must not depend on how NumPy or ml_dtypes convert float64 (ml_dtypes 0.7.0
    made float64 -> bfloat16 one correct rounding; before, it went through float32)."""
    assert frameworks != one_step  # the case really is a double-rounding case
    assert dtypes.widen(dtypes.round_to(np.array([x]), name)).tolist() == [frameworks]


def _near_ties(name: str) -> np.ndarray:
    """float64 values within a float32 rounding of a tie of ``name`` (both signs, normal and
    subnormal), plus random values: where one-step and two-step rounding can differ."""
    p = PRECISION[name]
    rng = _rng(f"test_dtypes.near_ties.{name}")
    significands = rng.integers(2 ** (p - 1), 2**p, 400).astype(np.float64) + 0.5  # halfway points
    offsets = rng.choice([-1.0, 1.0], 400) * rng.integers(1, 2**20, 400) * 2.0**-40  # < float32's half ulp
    ties = (significands / 2.0 ** (p - 1)) * (1 + offsets)
    x = np.ldexp(ties, rng.integers(-12, 12, 400)) * rng.choice([-1.0, 1.0], 400)
    info = dtypes.dtype_info(name)
    units = rng.integers(0, 2 ** (p - 1), 100) + 0.5 + rng.choice([-1.0, 1.0], 100) * 2.0**-30
    subnormal = units * info.smallest_subnormal
    return np.concatenate([x, subnormal, rng.normal(0.0, 3.0, 500), [np.nan, np.inf, -np.inf, 0.0, -0.0]])


def _torch_cast(x: np.ndarray, name: str) -> np.ndarray:
    torch = pytest.importorskip("torch")
    return torch.from_numpy(x).to(getattr(torch, name)).to(torch.float64).numpy()


def _tf_cast(x: np.ndarray, name: str) -> np.ndarray:
    tf = pytest.importorskip("tensorflow")
    with tf.device("/CPU:0"):
        return np.asarray(tf.cast(tf.cast(tf.constant(x, tf.float64), name), tf.float64).numpy())


def _jax_cast(x: np.ndarray, name: str) -> np.ndarray:
    jax = pytest.importorskip("jax")
    with jax.enable_x64(True):
        y = jax.numpy.asarray(x, dtype="float64").astype(name).astype("float64")
        return np.asarray(jax.device_get(y))


#: (framework, dtype) whose float64 cast flushes values below float32's smallest normal to zero
#: (TensorFlow's and XLA:CPU's casts run with flush-to-zero on their float32 step; float16's subnormals
#: lie far above that, and torch flushes nothing). The suite never lets a framework cast its inputs, so
#: this does not reach the data; it is pinned here so that a change is seen.
FLUSHES_SUBNORMALS = {("tensorflow", "bfloat16"), ("tensorflow", "float32"), ("jax", "bfloat16"), ("jax", "float32")}


#: (framework, dtype) whose float64 cast rounds once (float64 -> float16 directly) on CPUs with AVX512-FP16
#: and twice (through float32) elsewhere: XLA:CPU emits the ISA's direct conversion where it exists
#: (measured: a Xeon with avx512_fp16 rounds 1.61083983 to 1.61035156, the correctly rounded float16, where
#: through float32 it ties up to 1.61132812). Either is a faithful cast; the suite never lets a framework
#: cast its inputs (``round_to`` does), so the verdict does not depend on it, and this test must not either.
ROUNDS_ONCE_ON_SOME_CPUS = {("jax", "float16")}


def _same_values(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: both NaN, or the same bits (so -0.0 differs from 0.0)."""
    return (np.isnan(a) & np.isnan(b)) | (a.view(np.uint64) == b.view(np.uint64))


@pytest.mark.parametrize("framework", ["torch", "tensorflow", "jax"])
@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32"])
def test_round_to_equals_the_frameworks_own_cast(framework: str, name: str) -> None:
    """Bit for bit, on values where one and two roundings differ: the framework's tensor cast of a
    float64 tensor and ``round_to`` give the same value (each framework's cast is measured, not assumed)."""
    cast = {"torch": _torch_cast, "tensorflow": _tf_cast, "jax": _jax_cast}[framework]
    x = _near_ties(name)
    mine = dtypes.widen(dtypes.round_to(x, name))
    theirs = cast(x, name)
    same = _same_values(mine, theirs)
    if (framework, name) in ROUNDS_ONCE_ON_SOME_CPUS:
        same |= _same_values(x.astype(np.float16).astype(np.float64), theirs)
    if (framework, name) in FLUSHES_SUBNORMALS:
        tiny = (x != 0) & (np.abs(x) < dtypes.dtype_info("float32").smallest_normal)
        assert tiny.sum() > 50
        assert np.all(theirs[tiny] == 0), f"{framework} no longer flushes tiny values in its {name} cast"
        same |= tiny
    assert same.all(), (
        f"{np.sum(~same)} of {x.size} differ: x {x[~same][:3]!r}, round_to {mine[~same][:3]!r}, "
        f"{framework} {theirs[~same][:3]!r}"
    )
    if name != "float32":  # the values do exercise the difference: one correct rounding disagrees
        direct = _one_rounding(x, PRECISION[name], dtypes.dtype_info(name))
        assert np.sum(~_same_values(direct, mine)) > 10


def _one_rounding(x: np.ndarray, p: int, info: dtypes.DTypeInfo) -> np.ndarray:
    """Correct rounding of float64 to p significand bits (with the format's subnormal spacing and
    overflow), written with NumPy's float64 arithmetic only: the one-step reference."""
    out = x.copy()
    finite = np.isfinite(x) & (x != 0)
    _, e = np.frexp(np.abs(x[finite]))
    spacing = np.maximum(np.ldexp(1.0, e - p), info.smallest_subnormal)
    out[finite] = np.round(x[finite] / spacing) * spacing  # x/spacing is exact; np.round is half-to-even
    out[np.abs(out) > info.max] = np.copysign(np.inf, out[np.abs(out) > info.max])
    return out


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
