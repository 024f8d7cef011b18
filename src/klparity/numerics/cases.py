"""Deterministic test cases: (teacher logits, student logits, temperature), identified by id.

Every case is named by a stable id; its seed is ``crc32(id)`` (plus the user's ``--klparity-seed``
shift), and its arrays are generated in NumPy float64 with ``np.random.default_rng(seed)`` only when
asked for — never at collection time — so every xdist worker and every framework sees the same data.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]
Generator = Callable[[np.random.Generator, tuple[int, ...], float], tuple[F64, F64]]

TIERS: Final = ("quick", "full")
#: Temperatures of the main grid, and the extremes used where they are meaningful.
TEMPERATURES: Final = (0.5, 1.0, 2.0, 5.0, 10.0)
EXTREME_TEMPERATURES: Final = (0.05, 1000.0)


# --------------------------------------------------------------------------------- generators
# Each takes (rng, shape, parameter) and returns (teacher_logits, student_logits) in float64.


def _gauss(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> tuple[F64, F64]:
    """Independent N(0, scale^2) teacher and student logits."""
    return rng.normal(0.0, scale, shape), rng.normal(0.0, scale, shape)


def _peaked(rng: np.random.Generator, shape: tuple[int, ...], boost: float) -> tuple[F64, F64]:
    """Near one-hot teacher: N(0, 1) plus ``boost`` on one random class per row."""
    teacher = rng.normal(0.0, 1.0, shape)
    hot = rng.integers(0, shape[-1], shape[:-1])
    np.put_along_axis(teacher, hot[..., None], np.take_along_axis(teacher, hot[..., None], -1) + boost, -1)
    return teacher, rng.normal(0.0, 3.0, shape)


def _onehot(rng: np.random.Generator, shape: tuple[int, ...], _: float) -> tuple[F64, F64]:
    """Exact one-hot target: teacher logit 0 on one class, -inf elsewhere (softmax is one-hot)."""
    teacher = np.full(shape, -np.inf)
    hot = rng.integers(0, shape[-1], shape[:-1])
    np.put_along_axis(teacher, hot[..., None], 0.0, -1)
    return teacher, rng.normal(0.0, 3.0, shape)


def _identical(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> tuple[F64, F64]:
    """Teacher and student are the same array: KL is exactly 0."""
    x = rng.normal(0.0, scale, shape)
    return x, x.copy()


def _uniform(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> tuple[F64, F64]:
    """Uniform teacher (all logits 0), N(0, scale^2) student."""
    return np.zeros(shape), rng.normal(0.0, scale, shape)


def _spread(rng: np.random.Generator, shape: tuple[int, ...], width: float) -> tuple[F64, F64]:
    """Logits uniform over a range of ``width``: most probabilities underflow to 0 in float32."""
    half = width / 2.0
    return rng.uniform(-half, half, shape), rng.uniform(-half, half, shape)


def _mask(rng: np.random.Generator, shape: tuple[int, ...], frac: float) -> NDArray[np.bool_]:
    """A random ``frac`` of classes per row, always masking the last class and never the first."""
    mask = rng.random(shape) < frac
    mask[..., -1] = True
    mask[..., 0] = False
    return mask


def _masked(rng: np.random.Generator, shape: tuple[int, ...], frac: float) -> tuple[F64, F64]:
    """Masked vocabulary: a random ``frac`` of classes is -inf in both teacher and student."""
    teacher, student = rng.normal(0.0, 3.0, shape), rng.normal(0.0, 3.0, shape)
    mask = _mask(rng, shape, frac)
    teacher[mask] = -np.inf
    student[mask] = -np.inf
    return teacher, student


def _teacher_masked(rng: np.random.Generator, shape: tuple[int, ...], frac: float) -> tuple[F64, F64]:
    """Zero-probability target classes: teacher -inf on a random ``frac`` of classes only."""
    teacher, student = rng.normal(0.0, 3.0, shape), rng.normal(0.0, 3.0, shape)
    teacher[_mask(rng, shape, frac)] = -np.inf
    return teacher, student


def _student_masked(rng: np.random.Generator, shape: tuple[int, ...], _: float) -> tuple[F64, F64]:
    """Student -inf on class 0 where the teacher has mass: the exact KL is +inf."""
    teacher, student = rng.normal(0.0, 3.0, shape), rng.normal(0.0, 3.0, shape)
    student[..., 0] = -np.inf
    return teacher, student


def _nan(rng: np.random.Generator, shape: tuple[int, ...], _: float) -> tuple[F64, F64]:
    """One NaN teacher logit in the first row: that row's KL (and any reduction) must be NaN."""
    teacher, student = rng.normal(0.0, 3.0, shape), rng.normal(0.0, 3.0, shape)
    teacher.reshape(-1, shape[-1])[0, shape[-1] // 2] = np.nan
    return teacher, student


def _seed_article(_rng: np.random.Generator, _shape: tuple[int, ...], _p: float) -> tuple[F64, F64]:
    """The published example: target logits [5, 4, 0.1], input logits [4, 3.9, 1]."""
    return np.array([5.0, 4.0, 0.1]), np.array([4.0, 3.9, 1.0])


FAMILIES: Final[dict[str, Generator]] = {
    "gauss": _gauss,
    "peaked": _peaked,
    "onehot": _onehot,
    "identical": _identical,
    "uniform": _uniform,
    "spread": _spread,
    "masked": _masked,
    "teacher_masked": _teacher_masked,
    "student_masked": _student_masked,
    "nan": _nan,
    "seed_article": _seed_article,
}


@dataclass(frozen=True)
class Case:
    """One deterministic case. Arrays are made on demand from ``seed(shift)``."""

    family: str
    shape: tuple[int, ...]
    temperature: float
    param: float = 0.0
    tier: str = "quick"
    id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown case family {self.family!r}; expected one of {sorted(FAMILIES)}")
        if not self.id:
            object.__setattr__(self, "id", make_id(self.family, self.param, self.shape, self.temperature))

    def seed(self, shift: int = 0) -> int:
        """crc32 of the id, shifted by the user's ``--klparity-seed`` (mod 2**32)."""
        return (zlib.crc32(self.id.encode("utf-8")) + shift) % 2**32

    def logits(self, shift: int = 0) -> tuple[F64, F64]:
        """(teacher, student) float64 logits, identical on every call and every process."""
        rng = np.random.default_rng(self.seed(shift))
        teacher, student = FAMILIES[self.family](rng, self.shape, self.param)
        return np.ascontiguousarray(teacher, np.float64), np.ascontiguousarray(student, np.float64)


def _fmt(x: float) -> str:
    return f"{x:g}".replace("+", "")


def make_id(family: str, param: float, shape: tuple[int, ...], temperature: float) -> str:
    """Stable, human-readable case id, e.g. ``gauss3_8x1000_T0.5``."""
    name = family + (_fmt(param) if param else "")
    return f"{name}_{'x'.join(map(str, shape))}_T{_fmt(temperature)}"


def _quick() -> list[Case]:
    c = [
        Case("seed_article", (3,), 1.0, id="seed_article_T1"),
        Case("seed_article", (3,), 5.0, id="seed_article_T5"),
    ]
    c += [Case("gauss", (8, 1000), t, 3.0) for t in TEMPERATURES + EXTREME_TEMPERATURES]
    c += [
        Case("gauss", (4, 10), 1.0, 1.0),
        Case("gauss", (4, 10), 2.0, 10.0),
        Case("gauss", (16, 2), 1.0, 3.0),
        Case("gauss", (1000,), 2.0, 3.0),
        Case("gauss", (2, 32000), 1.0, 3.0),
        Case("gauss", (2, 4, 100), 1.0, 3.0),
        Case("gauss", (2, 4, 100), 5.0, 3.0),
        Case("peaked", (8, 1000), 1.0, 12.0),
        Case("peaked", (8, 1000), 5.0, 12.0),
        Case("onehot", (8, 1000), 1.0),
        Case("onehot", (4, 32000), 1.0),
        Case("identical", (8, 1000), 1.0, 3.0),
        Case("identical", (2, 3, 50), 2.0, 3.0),
        Case("uniform", (8, 100), 1.0, 3.0),
        Case("spread", (4, 100), 1.0, 30.0),
        Case("spread", (4, 100), 1.0, 1e4),
        Case("masked", (8, 1000), 1.0, 0.25),
        Case("masked", (2, 4, 100), 2.0, 0.25),
        Case("teacher_masked", (8, 100), 1.0, 0.25),
        Case("student_masked", (4, 10), 1.0),
        Case("nan", (4, 10), 1.0),
    ]
    return c


def _full() -> list[Case]:
    """Cross product of families, shapes and temperatures, minus what the quick tier has."""
    shapes = [(2,), (10,), (1000,), (4, 2), (8, 10), (8, 1000), (2, 32000), (2, 3, 100), (2, 2, 32000)]
    families: list[tuple[str, float]] = [
        ("gauss", 1.0), ("gauss", 3.0), ("gauss", 10.0), ("peaked", 12.0), ("onehot", 0.0),
        ("identical", 3.0), ("uniform", 3.0), ("spread", 30.0), ("spread", 1e4),
        ("masked", 0.25), ("teacher_masked", 0.25), ("student_masked", 0.0), ("nan", 0.0),
    ]  # fmt: skip
    out = []
    for (fam, param), shape, t in itertools.product(families, shapes, TEMPERATURES):
        out.append(Case(fam, shape, t, param, tier="full"))
    for shape, t in itertools.product([(8, 1000), (2, 32000), (2, 3, 100)], EXTREME_TEMPERATURES):
        out.append(Case("gauss", shape, t, 3.0, tier="full"))
        out.append(Case("peaked", shape, t, 12.0, tier="full"))
    return out


def cases(tier: str = "quick") -> list[Case]:
    """All cases of a tier; ``full`` includes ``quick``. Ids are unique and sorted stably."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")
    quick = _quick()
    if tier == "quick":
        return quick
    seen = {c.id for c in quick}
    return quick + [c for c in _full() if c.id not in seen]


def case_by_id(case_id: str) -> Case:
    """Find a case of the full tier by id (for one-line repros)."""
    for c in cases("full"):
        if c.id == case_id:
            return c
    raise ValueError(f"unknown case id {case_id!r}")


def iter_ids(tier: str) -> Iterator[str]:
    """Case ids of a tier, in order."""
    return (c.id for c in cases(tier))
