"""Frozen golden cases: exact inputs in each dtype's bits, mpmath KL and gradients rounded once.

Each golden is (teacher logits, student logits, T) stored as the raw bit patterns of the tested dtype
(uint16 for float16/bfloat16, uint32 for float32, uint64 for float64), so the values are exact by
construction. The references are computed with mpmath at ``MP_DPS`` significant digits from those
exact values and rounded to float64 once:

* ``kl``: per-row KL(softmax(t/T) || softmax(s/T)) over the last axis (exact semantics: a class
  masked with -inf on both sides contributes 0, teacher mass where the student is -inf gives +inf,
  NaN in a row gives NaN);
* ``grad``: d KL / d student logits = (softmax(s/T) - softmax(t/T)) / T per element;
* ``kl_sum``: the sum of all rows of a case (for the batch reductions).

The arrays live in ``fixtures/goldens.npz`` (written without timestamps, so regenerating gives the
same bytes) and are described by ``fixtures/goldens.json`` (a readable manifest with the npz's
sha256). Run ``python -m klparity.numerics.goldens regenerate`` to rewrite both, ``... check`` to verify.

Input values come from PCG64's raw 64-bit stream (fixed across NumPy versions) turned into numbers
with IEEE additions and multiplications only (no libm), so regeneration is bit-for-bit everywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import struct
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from klparity.numerics.dtypes import DTYPE_NAMES, dtype_info, round_to, widen

#: Suffix of the API id of every result judged against the goldens.
TAG: Final = " vs goldens"

F64 = NDArray[np.float64]

SCHEMA: Final = "klparity-goldens/1"
#: Bump when the case list, a family's generator or the reference computation changes.
GENERATOR_VERSION: Final = 2  # 2: float16 logits rounded through float32, as the frameworks cast
#: Significant decimal digits of the mpmath reference (the result is rounded to float64 once).
MP_DPS: Final = 60
NPZ_NAME: Final = "goldens.npz"
MANIFEST_NAME: Final = "goldens.json"
#: Environment variable naming a folder that holds the two files (overrides every other location).
ENV_DIR: Final = "KLPARITY_GOLDENS"
_ZIP_DATE: Final = (1980, 1, 1, 0, 0, 0)
_BITS: Final = {2: "<u2", 4: "<u4", 8: "<u8"}


class GoldensError(ValueError):
    """The golden files are missing, malformed or do not match their manifest."""


# ------------------------------------------------------------------------------ input streams


class _Stream:
    """Deterministic numbers from PCG64's raw stream using exact or correctly rounded IEEE ops."""

    def __init__(self, key: str) -> None:
        self._bg = np.random.PCG64(zlib.crc32(key.encode("utf-8")))

    def uniform(self, shape: tuple[int, ...]) -> F64:
        """Uniform [0, 1) with 53 random bits: (raw >> 11) * 2**-53, exact."""
        raw = np.asarray(self._bg.random_raw(math.prod(shape)), dtype=np.uint64)
        return np.asarray(((raw >> np.uint64(11)).astype(np.float64) * 2.0**-53).reshape(shape), np.float64)

    def normal(self, shape: tuple[int, ...], scale: float) -> F64:
        """Approximately N(0, scale^2): Irwin-Hall, a sum of 12 uniforms minus 6, added in order."""
        acc = self.uniform(shape)
        for _ in range(11):
            acc = acc + self.uniform(shape)
        return (acc - 6.0) * scale

    def index(self, rows: tuple[int, ...], n: int) -> NDArray[np.intp]:
        """One class index in [0, n) per row."""
        raw = np.asarray(self._bg.random_raw(math.prod(rows)), dtype=np.uint64)
        return np.asarray((raw % np.uint64(n)).astype(np.intp).reshape(rows), np.intp)


Family = Callable[[_Stream, tuple[int, ...], float], tuple[F64, F64]]


def _article(_g: _Stream, _shape: tuple[int, ...], _p: float) -> tuple[F64, F64]:
    return np.array([5.0, 4.0, 0.1]), np.array([4.0, 3.9, 1.0])


def _gauss(g: _Stream, shape: tuple[int, ...], scale: float) -> tuple[F64, F64]:
    return g.normal(shape, scale), g.normal(shape, scale)


def _put(x: F64, idx: NDArray[np.intp], value: F64 | float) -> None:
    np.put_along_axis(x, idx[..., None], value, -1)


def _peaked(g: _Stream, shape: tuple[int, ...], boost: float) -> tuple[F64, F64]:
    teacher = g.normal(shape, 1.0)
    hot = g.index(shape[:-1], shape[-1])
    _put(teacher, hot, np.take_along_axis(teacher, hot[..., None], -1) + boost)
    return teacher, g.normal(shape, 3.0)


def _onehot(g: _Stream, shape: tuple[int, ...], _p: float) -> tuple[F64, F64]:
    teacher = np.full(shape, -np.inf)
    _put(teacher, g.index(shape[:-1], shape[-1]), 0.0)
    return teacher, g.normal(shape, 3.0)


def _identical(g: _Stream, shape: tuple[int, ...], scale: float) -> tuple[F64, F64]:
    x = g.normal(shape, scale)
    return x, x.copy()


def _close(g: _Stream, shape: tuple[int, ...], eps: float) -> tuple[F64, F64]:
    teacher = g.normal(shape, 3.0)
    return teacher, teacher + g.normal(shape, eps)


def _uniform(g: _Stream, shape: tuple[int, ...], scale: float) -> tuple[F64, F64]:
    return np.zeros(shape), g.normal(shape, scale)


def _spread(g: _Stream, shape: tuple[int, ...], width: float) -> tuple[F64, F64]:
    return g.uniform(shape) * width - width / 2.0, g.uniform(shape) * width - width / 2.0


def _mask(g: _Stream, shape: tuple[int, ...], frac: float) -> NDArray[np.bool_]:
    mask = g.uniform(shape) < frac
    mask[..., 0] = False  # every row keeps a class
    return mask


def _masked(g: _Stream, shape: tuple[int, ...], frac: float) -> tuple[F64, F64]:
    teacher, student = g.normal(shape, 3.0), g.normal(shape, 3.0)
    mask = _mask(g, shape, frac)
    teacher[mask] = -np.inf
    student[mask] = -np.inf
    return teacher, student


def _teacher_masked(g: _Stream, shape: tuple[int, ...], frac: float) -> tuple[F64, F64]:
    teacher, student = g.normal(shape, 3.0), g.normal(shape, 3.0)
    teacher[_mask(g, shape, frac)] = -np.inf
    return teacher, student


def _student_masked(g: _Stream, shape: tuple[int, ...], _p: float) -> tuple[F64, F64]:
    teacher, student = g.normal(shape, 3.0), g.normal(shape, 3.0)
    student[..., 0] = -np.inf
    return teacher, student


def _nan(g: _Stream, shape: tuple[int, ...], _p: float) -> tuple[F64, F64]:
    teacher, student = g.normal(shape, 3.0), g.normal(shape, 3.0)
    teacher.reshape(-1, shape[-1])[0, shape[-1] // 2] = np.nan
    return teacher, student


#: name -> (generator, what it is). The descriptions go into the manifest.
FAMILIES: Final[dict[str, tuple[Family, str]]] = {
    "article": (_article, "the seed article: teacher [5, 4, 0.1], student [4, 3.9, 1]"),
    "gauss": (_gauss, "teacher and student ~ N(0, param^2) (Irwin-Hall), independent"),
    "peaked": (_peaked, "teacher N(0, 1) plus param on one class per row; student N(0, 9)"),
    "onehot": (_onehot, "exactly one-hot teacher (0 on one class, -inf elsewhere); student N(0, 9)"),
    "identical": (_identical, "teacher and student are the same N(0, param^2) array: KL = 0"),
    "close": (_close, "student = teacher + N(0, param^2): KL near 0"),
    "uniform": (_uniform, "uniform teacher (all logits 0); student N(0, param^2)"),
    "spread": (_spread, "logits uniform over a range of width param"),
    "masked": (_masked, "a fraction param of classes is -inf in both teacher and student"),
    "teacher_masked": (_teacher_masked, "a fraction param of teacher classes is -inf (p = 0)"),
    "student_masked": (_student_masked, "student -inf on class 0 where the teacher has mass: KL = +inf"),
    "nan": (_nan, "one NaN teacher logit in the first row: that row's KL and gradient are NaN"),
}


# ------------------------------------------------------------------------------- case list


def _fmt(x: float) -> str:
    return f"{x:g}".replace("+", "")


@dataclass(frozen=True)
class Spec:
    """How to make one golden case: a family, its parameter, a shape, a temperature, a dtype."""

    family: str
    shape: tuple[int, ...]
    param: float
    temperature: float
    dtype: str

    @property
    def stream_key(self) -> str:
        """Seed key: the same float64 values for every dtype and temperature of a scenario."""
        return f"{self.family}{_fmt(self.param)}_{'x'.join(map(str, self.shape))}"

    @property
    def id(self) -> str:
        """Stable id, e.g. ``gauss3_4x10_T0.05-float32``."""
        name = self.family + (_fmt(self.param) if self.param else "")
        return f"{name}_{'x'.join(map(str, self.shape))}_T{_fmt(self.temperature)}-{self.dtype}"

    def float64_logits(self) -> tuple[F64, F64]:
        """The unrounded float64 (teacher, student) logits."""
        make = FAMILIES[self.family][0]
        t, s = make(_Stream(self.stream_key), self.shape, self.param)
        return np.ascontiguousarray(t, np.float64), np.ascontiguousarray(s, np.float64)


#: (family, shape, param, temperatures, dtypes or () for all four)
_SCENARIOS: Final[tuple[tuple[str, tuple[int, ...], float, tuple[float, ...], tuple[str, ...]], ...]] = (
    ("article", (3,), 0.0, (1.0, 5.0), ()),
    ("gauss", (4, 10), 3.0, (0.05, 0.5, 1.0, 2.0, 5.0, 10.0, 1000.0), ()),
    ("gauss", (8, 10), 3.0, (0.25, 0.75, 1.5, 3.0, 20.0, 100.0), ()),
    ("gauss", (4, 10), 1.0, (0.5, 1.0, 2.0, 5.0), ()),
    ("gauss", (16, 2), 3.0, (1.0, 1000.0), ()),
    ("gauss", (100,), 3.0, (2.0,), ()),
    ("gauss", (2, 1000), 3.0, (0.5, 1.0, 5.0), ()),
    ("gauss", (4, 100), 1.0, (0.05, 1.0), ()),
    ("gauss", (4, 100), 10.0, (1.0, 2.0, 1000.0), ()),
    ("gauss", (2, 3, 50), 3.0, (1.0, 2.0), ()),
    ("gauss", (2, 2, 3, 10), 3.0, (1.0,), ()),
    ("peaked", (4, 100), 12.0, (0.05, 1.0, 5.0, 1000.0), ()),
    ("peaked", (8, 10), 12.0, (0.5, 2.0), ()),
    ("onehot", (4, 100), 0.0, (0.05, 1.0, 2.0), ()),
    ("onehot", (8, 10), 0.0, (0.5, 5.0), ()),
    ("onehot", (2, 1000), 0.0, (1.0,), ()),
    ("identical", (4, 100), 3.0, (1.0, 1000.0), ()),
    ("close", (4, 100), 1e-3, (1.0, 10.0), ()),
    ("close", (8, 10), 1e-6, (1.0,), ()),
    ("uniform", (4, 100), 3.0, (1.0, 5.0), ()),
    ("spread", (4, 100), 30.0, (1.0, 5.0), ()),
    ("spread", (4, 100), 1e4, (0.05, 1.0, 1000.0), ()),
    ("masked", (4, 100), 0.25, (0.05, 1.0, 2.0), ()),
    ("masked", (2, 3, 50), 0.5, (1.0,), ()),
    ("teacher_masked", (4, 100), 0.25, (1.0, 5.0), ()),
    ("student_masked", (4, 10), 0.0, (1.0, 2.0), ()),
    ("nan", (4, 10), 0.0, (1.0,), ()),
    # a language-model vocabulary: 2^15 classes, a row or two (mpmath costs ~35 us per element)
    ("gauss", (1, 32768), 3.0, (1.0,), ("float32",)),
    ("gauss", (1, 32768), 3.0, (2.0,), ("bfloat16",)),
    ("masked", (1, 32768), 0.5, (1.0,), ("float16",)),
)


def specs() -> list[Spec]:
    """Every golden case, in file order. Ids are unique."""
    out = [
        Spec(fam, shape, param, t, dt)
        for fam, shape, param, temps, dtypes in _SCENARIOS
        for dt in (dtypes or DTYPE_NAMES)
        for t in temps
    ]
    ids = [s.id for s in out]
    assert len(set(ids)) == len(ids), "duplicate golden ids"
    return out


# ------------------------------------------------------------------------ mpmath reference


def to_float64(x: Any) -> float:
    """Round an mpmath number to the nearest float64 (ties to even), subnormals included."""
    import mpmath

    if mpmath.isnan(x):
        return math.nan
    if mpmath.isinf(x):
        return math.inf if x > 0 else -math.inf
    sign, man, exp, _ = mpmath.mpf(x)._mpf_
    if not man:
        return 0.0
    v = man / (1 << -exp) if exp < 0 else float(man << exp)  # int / int is correctly rounded
    return -v if sign else v


def _mp_log_softmax(row: Sequence[float], temperature: Any) -> list[Any] | None:
    """log softmax(row / T) in mpmath from the exact values; ``None`` entries are -inf.

    Returns None when the row has no distribution (NaN or +inf anywhere, or all -inf).
    """
    import mpmath

    if any(math.isnan(v) or v == math.inf for v in row):
        return None
    z = {i: mpmath.mpf(v) / temperature for i, v in enumerate(row) if v != -math.inf}
    if not z:
        return None
    m = max(z.values())
    lse = m + mpmath.log(mpmath.fsum(mpmath.exp(v - m) for v in z.values()))
    return [z[i] - lse if i in z else None for i in range(len(row))]


def _mp_row(teacher: Sequence[float], student: Sequence[float], temperature: float) -> tuple[Any, list[Any]]:
    """(KL, gradient w.r.t. the student logits) of one row, in mpmath."""
    import mpmath

    t = mpmath.mpf(temperature)
    lp, lq = _mp_log_softmax(teacher, t), _mp_log_softmax(student, t)
    if lp is None or lq is None:
        return mpmath.nan, [mpmath.nan] * len(teacher)
    terms, grad, infinite = [], [], False
    for a, b in zip(lp, lq, strict=True):
        p = mpmath.exp(a) if a is not None else mpmath.mpf(0)
        q = mpmath.exp(b) if b is not None else mpmath.mpf(0)
        if a is not None:
            if b is None:
                infinite = True
            else:
                terms.append(p * (a - b))
        grad.append((q - p) / t)
    return (mpmath.inf if infinite else mpmath.fsum(terms)), grad


@dataclass(frozen=True)
class Golden:
    """One golden case: exact inputs (float64 widening of the dtype values) and references."""

    id: str
    family: str
    param: float
    dtype: str
    temperature: float
    teacher: F64
    student: F64
    kl: F64  #: per row, shape ``teacher.shape[:-1]``
    kl_sum: float  #: sum of every row, rounded once
    grad: F64  #: d KL / d student logits, same shape as the logits

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.teacher.shape)

    def typed(self) -> tuple[NDArray[np.generic], NDArray[np.generic]]:
        """(teacher, student) as arrays of the golden's own dtype (exact)."""
        return round_to(self.teacher, self.dtype), round_to(self.student, self.dtype)


def compute(spec: Spec, dps: int = MP_DPS) -> Golden:
    """Round the spec's logits to its dtype and compute the references at ``dps`` digits."""
    import mpmath

    t64, s64 = spec.float64_logits()
    teacher, student = widen(round_to(t64, spec.dtype)), widen(round_to(s64, spec.dtype))
    c = teacher.shape[-1]
    kls, grads = [], []
    with mpmath.workdps(dps):
        for trow, srow in zip(teacher.reshape(-1, c).tolist(), student.reshape(-1, c).tolist(), strict=True):
            kl, g = _mp_row(trow, srow, spec.temperature)
            kls.append(kl)
            grads.append([to_float64(v) for v in g])
        total = to_float64(mpmath.fsum(kls))
    return Golden(
        id=spec.id, family=spec.family, param=spec.param, dtype=spec.dtype,
        temperature=spec.temperature, teacher=teacher, student=student,
        kl=np.array([to_float64(v) for v in kls], np.float64).reshape(teacher.shape[:-1]),
        kl_sum=total,
        grad=np.array(grads, np.float64).reshape(teacher.shape),
    )  # fmt: skip


def generate(selected: Iterable[Spec] | None = None, dps: int = MP_DPS) -> list[Golden]:
    """Compute the goldens of ``selected`` (default: all)."""
    return [compute(s, dps) for s in (specs() if selected is None else selected)]


# ------------------------------------------------------------------- deterministic files


def _bits(x: F64, dtype: str) -> NDArray[np.unsignedinteger[Any]]:
    typed = round_to(x, dtype)
    return np.ascontiguousarray(typed).view(_BITS[typed.dtype.itemsize])


def _npy(arr: NDArray[Any]) -> bytes:
    """NPY 1.0 bytes, little-endian, with a header fixed by this function (not by NumPy's version)."""
    arr = np.asarray(arr)  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    arr = arr.astype(arr.dtype.newbyteorder("<"), order="C")
    shape = repr(tuple(int(n) for n in arr.shape))
    header = f"{{'descr': '{arr.dtype.str}', 'fortran_order': False, 'shape': {shape}, }}"
    pad = 64 - (10 + len(header) + 1) % 64
    head = (header + " " * pad + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head + arr.tobytes()


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _zip(entries: Iterable[tuple[str, bytes]]) -> bytes:
    """A stored (uncompressed) zip with fixed dates and attributes: the same bytes every time."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            zf.writestr(info, data)
    return buf.getvalue()


def encode(goldens: Sequence[Golden]) -> tuple[bytes, bytes]:
    """(npz bytes, manifest bytes) of ``goldens``; a pure function of the arrays."""
    entries: list[tuple[str, bytes]] = []
    for g in goldens:
        entries.append((f"{g.id}/logits.npy", _npy(np.stack([_bits(g.teacher, g.dtype), _bits(g.student, g.dtype)]))))
        entries.append((f"{g.id}/kl.npy", _npy(g.kl)))
        entries.append((f"{g.id}/grad.npy", _npy(g.grad)))
    entries.append(("kl_sum.npy", _npy(np.array([g.kl_sum for g in goldens], np.float64))))
    npz = _zip(entries)
    manifest = {
        "schema": SCHEMA,
        "generator_version": GENERATOR_VERSION,
        "mpmath_dps": MP_DPS,
        "regenerate": "python -m klparity.numerics.goldens regenerate",
        "reference": "kl: per-row KL(softmax(teacher/T) || softmax(student/T)) over the last axis; "
        "grad: (softmax(student/T) - softmax(teacher/T)) / T, the gradient of the row's KL w.r.t. the "
        f"student logits; kl_sum: the sum of all rows. Computed with mpmath at {MP_DPS} digits from "
        "the exact dtype values, each rounded to float64 once. Masked class (-inf in both): 0; "
        "teacher mass where the student is -inf: +inf; NaN in a row: NaN.",
        "storage": "npz entries '<id>/logits' (shape (2, *shape): teacher, student as the dtype's raw "
        "bits, uint16 for float16/bfloat16, uint32 for float32, uint64 for float64; view them as the "
        "dtype), '<id>/kl' and '<id>/grad' (float64), and 'kl_sum' (float64, one per case in this "
        "order). Stored uncompressed with fixed zip dates.",
        "npz": NPZ_NAME,
        "npz_sha256": hashlib.sha256(npz).hexdigest(),
        "count": len(goldens),
        "families": {name: desc for name, (_f, desc) in FAMILIES.items()},
        "cases": [
            {
                "id": g.id,
                "family": g.family,
                "param": g.param,
                "dtype": g.dtype,
                "shape": list(g.shape),
                "temperature": g.temperature,
                "kl_sum": _json_float(g.kl_sum),
                "kl": [_json_float(float(v)) for v in g.kl.ravel()],
            }
            for g in goldens
        ],
    }
    return npz, (json.dumps(manifest, indent=1) + "\n").encode("utf-8")


def write(goldens: Sequence[Golden], directory: Path) -> tuple[Path, Path]:
    """Write ``goldens.npz`` and ``goldens.json`` into ``directory`` (atomically, each)."""
    npz, manifest = encode(goldens)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, data in ((NPZ_NAME, npz), (MANIFEST_NAME, manifest)):
        path = directory / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        out.append(path)
    return out[0], out[1]


def locate(rootpath: Path | None = None) -> Path | None:
    """The folder holding the goldens: ``$KLPARITY_GOLDENS``, else ``<rootpath>/fixtures``, else the
    source checkout's ``fixtures/`` (found from this file); None when none has the manifest."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env) if (Path(env) / MANIFEST_NAME).is_file() else None
    candidates = [rootpath / "fixtures"] if rootpath is not None else []
    candidates.append(Path(__file__).resolve().parents[3] / "fixtures")
    return next((c for c in candidates if (c / MANIFEST_NAME).is_file()), None)


def _need(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise GoldensError(f"{where}: missing key {key!r}")
    if not isinstance(d[key], kind):
        raise GoldensError(f"{where}: {key!r} should be {kind}, got {type(d[key]).__name__}")
    return d[key]


def _manifest_float(v: float | str, where: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise GoldensError(f"{where}: {v!r} is not a number") from None


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest, with its schema checked."""
    path = directory / MANIFEST_NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise GoldensError(f"no golden manifest at {path}") from None
    except json.JSONDecodeError as e:
        raise GoldensError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise GoldensError(f"{path}: schema {doc.get('schema') if isinstance(doc, dict) else None!r}, "
                           f"expected {SCHEMA!r}")  # fmt: skip
    _need(doc, "cases", list, str(path))
    _need(doc, "npz_sha256", str, str(path))
    return doc


def load(directory: Path | None = None) -> list[Golden]:
    """Read and verify the goldens: sha256, entry names, shapes, dtypes, manifest values."""
    where = directory if directory is not None else locate()
    if where is None:
        raise GoldensError(f"golden files not found: set ${ENV_DIR} or run from a source checkout")
    doc = read_manifest(where)
    npz_path = where / NPZ_NAME
    try:
        data = npz_path.read_bytes()
    except FileNotFoundError:
        raise GoldensError(f"no golden arrays at {npz_path}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != doc["npz_sha256"]:
        raise GoldensError(f"{npz_path}: sha256 {digest} differs from the manifest's {doc['npz_sha256']}")
    out = []
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        sums = npz["kl_sum"]
        if sums.shape != (len(doc["cases"]),):
            raise GoldensError(f"kl_sum has shape {sums.shape}, expected ({len(doc['cases'])},)")
        for i, case in enumerate(doc["cases"]):
            w = f"{MANIFEST_NAME} case {i}"
            gid = _need(case, "id", str, w)
            dtype = _need(case, "dtype", str, w)
            if dtype not in DTYPE_NAMES:
                raise GoldensError(f"{w}: unknown dtype {dtype!r}")
            shape = tuple(_need(case, "shape", list, w))
            try:
                bits, kl, grad = npz[f"{gid}/logits"], npz[f"{gid}/kl"], npz[f"{gid}/grad"]
            except KeyError as e:
                raise GoldensError(f"{NPZ_NAME} lacks an entry of case {gid}: {e}") from None
            if bits.shape != (2, *shape) or bits.dtype != np.dtype(_BITS[dtype_info(dtype).numpy.itemsize]):
                raise GoldensError(f"{gid}: logits {bits.dtype}{bits.shape}, expected {dtype} bits of {shape}")
            if kl.shape != shape[:-1] or grad.shape != shape:
                raise GoldensError(f"{gid}: kl {kl.shape} / grad {grad.shape} do not fit shape {shape}")
            logits = widen(bits.view(dtype_info(dtype).numpy))
            golden = Golden(gid, str(case.get("family", "")), _manifest_float(case.get("param", 0.0), w),
                            dtype, _manifest_float(_need(case, "temperature", (int, float), w), w),
                            logits[0], logits[1], kl.astype(np.float64), float(sums[i]),
                            grad.astype(np.float64))  # fmt: skip
            listed = np.array([_manifest_float(v, w) for v in _need(case, "kl", list, w)], np.float64)
            if listed.tobytes() != golden.kl.ravel().tobytes() or (
                np.float64(_manifest_float(_need(case, "kl_sum", (int, float, str), w), w)).tobytes()
                != np.float64(golden.kl_sum).tobytes()
            ):
                raise GoldensError(f"{gid}: the manifest's kl values differ from the npz")
            out.append(golden)
    return out


def same(a: Golden, b: Golden) -> list[str]:
    """Differences between two goldens, bit for bit (NaN payloads included); empty when equal."""
    diffs = []
    for name in ("teacher", "student", "kl", "grad"):
        x, y = getattr(a, name), getattr(b, name)
        if x.shape != y.shape or x.tobytes() != y.tobytes():
            diffs.append(f"{a.id}: {name} differs")
    for name in ("id", "dtype", "temperature", "family", "param"):
        if getattr(a, name) != getattr(b, name):
            diffs.append(f"{a.id}: {name} {getattr(a, name)!r} != {getattr(b, name)!r}")
    if np.float64(a.kl_sum).tobytes() != np.float64(b.kl_sum).tobytes():
        diffs.append(f"{a.id}: kl_sum {a.kl_sum!r} != {b.kl_sum!r}")
    return diffs


# ------------------------------------------------------------------------------------ CLI


def _repo_fixtures() -> Path | None:
    root = Path(__file__).resolve().parents[3]
    return root / "fixtures" if (root / "pyproject.toml").is_file() else None


def cmd_regenerate(directory: Path | None) -> int:
    """Recompute every golden and rewrite the two files."""
    target = directory or _repo_fixtures()
    if target is None:
        print("goldens: not in a source checkout; pass --dir", file=sys.stderr)
        return 2
    start = time.perf_counter()
    goldens = generate()
    npz, manifest = write(goldens, target)
    print(f"wrote {len(goldens)} goldens to {npz} and {manifest} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_check(directory: Path | None, only: Sequence[str]) -> int:
    """Verify the stored files, recompute the goldens (or those whose id contains an ``only``
    substring) and compare them bit for bit; with no ``only``, also the bytes of both files."""
    where = directory or locate()
    try:
        stored = load(where)
    except GoldensError as e:
        print(f"goldens: {e}", file=sys.stderr)
        return 2
    assert where is not None
    by_id = {g.id: g for g in stored}
    todo = [s for s in specs() if not only or any(o in s.id for o in only)]
    problems = [f"{s.id}: in the case list but not stored" for s in todo if s.id not in by_id]
    if not only:
        listed = {s.id for s in todo}
        problems += [f"{g}: stored but not in the case list" for g in by_id if g not in listed]
    start = time.perf_counter()
    fresh = generate([s for s in todo if s.id in by_id])
    for g in fresh:
        problems += same(by_id[g.id], g)
    if not only and not problems:
        npz, manifest = encode(fresh)
        if npz != (where / NPZ_NAME).read_bytes() or manifest != (where / MANIFEST_NAME).read_bytes():
            problems.append("the regenerated files differ from the stored ones byte for byte")
    for p in problems[:50]:
        print(p)
    print(f"checked {len(fresh)} of {len(stored)} goldens in {where} in {time.perf_counter() - start:.1f} s: "
          + ("OK" if not problems else f"{len(problems)} problems"))  # fmt: skip
    return 1 if problems else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``regenerate`` / ``check`` sub-commands (shared with ``klparity goldens``)."""
    sub = parser.add_subparsers(dest="goldens_command", required=True)
    reg = sub.add_parser("regenerate", help="recompute the goldens with mpmath and rewrite the files")
    reg.add_argument("--dir", type=Path, default=None, help="output folder (default: the checkout's fixtures/)")
    chk = sub.add_parser("check", help="verify the stored goldens and recompute them bit for bit")
    chk.add_argument("--dir", type=Path, default=None, help=f"folder of the files (default: ${ENV_DIR} or fixtures/)")
    chk.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                     help="recompute only goldens whose id contains this (repeatable)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Dispatch parsed ``regenerate`` / ``check`` arguments."""
    if args.goldens_command == "regenerate":
        return cmd_regenerate(args.dir)
    return cmd_check(args.dir, args.only)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m klparity.numerics.goldens {regenerate,check}``."""
    parser = argparse.ArgumentParser(prog="python -m klparity.numerics.goldens", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
