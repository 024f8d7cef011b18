"""Tests of ``klparity.numerics.cases``: stable ids, tiers, and bit-for-bit deterministic case arrays.

Determinism is checked across calls and across processes: a child interpreter started with a
different ``PYTHONHASHSEED`` must produce the same sha256 digest of every case's arrays.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from klparity.engine import forward
from klparity.numerics import cases, exact, oracle
from klparity.numerics.cases import Case

SRC = Path(__file__).resolve().parents[2] / "src"

DIGEST_SCRIPT = """
import hashlib, sys
from klparity.numerics import cases
h = hashlib.sha256()
for case in cases.cases(sys.argv[1]):
    teacher, student = case.logits(int(sys.argv[2]))
    for part in (case.id.encode(), repr(teacher.shape).encode(), teacher.tobytes(), student.tobytes()):
        h.update(part)
print(h.hexdigest())
"""

RANDOM_FAMILIES = sorted(set(cases.FAMILIES) - {"seed_article"})


def _digest(tier: str, shift: int) -> str:
    """The same digest as DIGEST_SCRIPT, computed in this process."""
    h = hashlib.sha256()
    for case in cases.cases(tier):
        teacher, student = case.logits(shift)
        for part in (case.id.encode(), repr(teacher.shape).encode(), teacher.tobytes(), student.tobytes()):
            h.update(part)
    return h.hexdigest()


def _child_digest(tier: str, shift: int, hash_seed: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONHASHSEED": hash_seed}
    out = subprocess.run(
        [sys.executable, "-c", DIGEST_SCRIPT, tier, str(shift)],
        env=env,
        cwd=SRC.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip()


def _by_family(tier: str, family: str) -> list[Case]:
    found = [c for c in cases.cases(tier) if c.family == family]
    assert found, f"no {family} case in tier {tier}"
    return found


# ------------------------------------------------------------------------- ids and tiers


@pytest.mark.parametrize("tier", cases.TIERS)
def test_ids_are_unique(tier: str) -> None:
    ids = [c.id for c in cases.cases(tier)]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates
    assert len(ids) > 20
    assert all(ids) and all(" " not in i for i in ids)


def test_quick_is_a_subset_of_full() -> None:
    quick, full = cases.cases("quick"), cases.cases("full")
    full_by_id = {c.id: c for c in full}
    assert len(full) > len(quick)
    for c in quick:
        assert c.id in full_by_id
        assert full_by_id[c.id] == c  # same family, shape, temperature, param and tier
    assert {c.tier for c in quick} == {"quick"}
    assert {c.tier for c in full} == {"quick", "full"}


def test_default_tier_is_quick_and_iter_ids_follows_cases() -> None:
    assert [c.id for c in cases.cases()] == [c.id for c in cases.cases("quick")]
    for tier in cases.TIERS:
        assert list(cases.iter_ids(tier)) == [c.id for c in cases.cases(tier)]


def test_case_by_id_finds_full_tier_cases() -> None:
    for case in cases.cases("full")[::37]:
        assert cases.case_by_id(case.id) is not None
        assert cases.case_by_id(case.id).id == case.id
    with pytest.raises(ValueError, match="unknown case id 'nope'"):
        cases.case_by_id("nope")


def test_make_id_format() -> None:
    assert cases.make_id("gauss", 3.0, (8, 1000), 0.5) == "gauss3_8x1000_T0.5"
    assert cases.make_id("onehot", 0.0, (2, 3, 100), 1000.0) == "onehot_2x3x100_T1000"
    assert cases.make_id("spread", 1e4, (4, 100), 1.0) == "spread10000_4x100_T1"
    assert Case("gauss", (8, 1000), 0.5, 3.0).id == "gauss3_8x1000_T0.5"
    assert Case("seed_article", (3,), 1.0, id="custom").id == "custom"


def test_unknown_family_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown case family 'gaus'"):
        Case("gaus", (4, 10), 1.0)


@pytest.mark.parametrize("tier", ["medium", "Quick", "", "all"])
def test_unknown_tier_is_refused(tier: str) -> None:
    with pytest.raises(ValueError, match=f"unknown tier {tier!r}"):
        cases.cases(tier)


# ------------------------------------------------------------------------- determinism


def test_seed_is_crc32_of_the_id() -> None:
    case = Case("gauss", (4, 10), 1.0, 3.0)
    assert case.seed() == zlib.crc32(b"gauss3_4x10_T1")
    assert case.seed(5) == (zlib.crc32(b"gauss3_4x10_T1") + 5) % 2**32
    assert case.seed(2**32) == case.seed()  # the shift wraps modulo 2**32


@pytest.mark.parametrize("tier", cases.TIERS)
def test_logits_are_deterministic_across_calls(tier: str) -> None:
    for case in cases.cases(tier)[::3]:
        t1, s1 = case.logits()
        t2, s2 = case.logits()
        assert t1.tobytes() == t2.tobytes() and s1.tobytes() == s2.tobytes(), case.id
        assert t1.dtype == s1.dtype == np.float64
        assert t1.shape == s1.shape == case.shape
        assert t1.flags.c_contiguous and s1.flags.c_contiguous
        assert t1 is not t2  # fresh arrays: a caller mutating one cannot change the next


def test_logits_are_identical_in_a_fresh_process_with_another_hash_seed() -> None:
    """Ids, not ``hash()``, drive the seeds: other PYTHONHASHSEED values give the same bytes."""
    here = _digest("full", 0)
    assert _child_digest("full", 0, "0") == here
    assert _child_digest("full", 0, "987654321") == here


def test_seed_shift_is_honoured_in_a_fresh_process() -> None:
    assert _child_digest("quick", 7, "12345") == _digest("quick", 7)
    assert _digest("quick", 7) != _digest("quick", 0)


@pytest.mark.parametrize("family", RANDOM_FAMILIES)
def test_seed_shift_changes_random_families(family: str) -> None:
    for case in _by_family("full", family)[::5]:
        t0, s0 = case.logits()
        t1, s1 = case.logits(1)
        assert t0.shape == t1.shape
        changed = t0.tobytes() != t1.tobytes() or s0.tobytes() != s1.tobytes()
        assert changed, case.id
        t_wrapped, s_wrapped = case.logits(2**32)  # same seed as shift 0
        assert t_wrapped.tobytes() == t0.tobytes() and s_wrapped.tobytes() == s0.tobytes()


def test_seed_shift_does_not_change_the_seed_article_case() -> None:
    for case in _by_family("full", "seed_article"):
        t0, s0 = case.logits()
        for shift in (1, 12345, 2**31):
            t, s = case.logits(shift)
            assert t.tobytes() == t0.tobytes() and s.tobytes() == s0.tobytes()


# ------------------------------------------------------------------------- families


def test_seed_article_arrays_are_exact() -> None:
    found = _by_family("quick", "seed_article")
    assert sorted(c.id for c in found) == ["seed_article_T1", "seed_article_T5"]
    for case in found:
        teacher, student = case.logits()
        assert teacher.tolist() == [5.0, 4.0, 0.1]
        assert student.tolist() == [4.0, 3.9, 1.0]
        assert teacher.dtype == student.dtype == np.float64
    assert {c.temperature for c in found} == {1.0, 5.0}


def test_onehot_teacher_softmax_is_exactly_one_hot() -> None:
    for case in _by_family("full", "onehot"):
        teacher, student = case.logits()
        p = oracle.softmax(teacher, case.temperature)
        assert set(np.unique(p).tolist()) == {0.0, 1.0}, case.id
        assert np.all(np.sum(p == 1.0, axis=-1) == 1), case.id
        assert np.all(np.isfinite(student)), case.id


def test_masked_family_masks_the_same_classes_on_both_sides() -> None:
    for case in _by_family("full", "masked"):
        teacher, student = case.logits()
        mask_t, mask_s = np.isneginf(teacher), np.isneginf(student)
        np.testing.assert_array_equal(mask_t, mask_s, err_msg=case.id)
        if teacher.size >= 20:  # tiny shapes such as (2,) may draw no masked class at all
            assert mask_t.any(), case.id
        assert not mask_t[..., 0].any(), case.id  # class 0 is never masked: no row is all -inf
        assert np.all(np.isfinite(teacher[~mask_t])) and np.all(np.isfinite(student[~mask_s])), case.id
        if teacher.shape[-1] >= 100:  # about case.param of the classes is masked
            assert abs(mask_t.mean() - case.param) < 0.1, case.id


def test_teacher_masked_family_masks_only_the_teacher() -> None:
    for case in _by_family("full", "teacher_masked"):
        teacher, student = case.logits()
        assert np.all(np.isfinite(student)), case.id
        assert not np.isneginf(teacher)[..., 0].any(), case.id
        if teacher.size >= 20:
            assert np.isneginf(teacher).any(), case.id


def test_student_masked_family_gives_infinite_kl() -> None:
    for case in _by_family("quick", "student_masked"):
        teacher, student = case.logits()
        assert np.all(np.isneginf(student[..., 0]))
        assert np.all(oracle.kl_from_logits(teacher, student, case.temperature) == math.inf)


def test_nan_family_poisons_exactly_the_first_row() -> None:
    for case in _by_family("full", "nan"):
        teacher, student = case.logits()
        rows = teacher.reshape(-1, teacher.shape[-1])
        assert np.isnan(rows[0]).sum() == 1, case.id
        assert not np.isnan(rows[1:]).any() and not np.isnan(student).any(), case.id


def test_identical_family_is_identical() -> None:
    for case in _by_family("full", "identical"):
        teacher, student = case.logits()
        assert teacher.tobytes() == student.tobytes(), case.id
        assert teacher is not student


def test_uniform_family_has_an_all_zero_teacher() -> None:
    for case in _by_family("full", "uniform"):
        teacher, student = case.logits()
        assert not teacher.any(), case.id
        assert student.std() > 0, case.id


def test_kept_inputs_are_shared_read_only_and_bounded() -> None:
    """Cells of one case and dtype share one read-only copy; the store never holds more than its limit."""
    case = cases.cases("quick")[0]
    t, s = exact.rounded(case, 0, "float16")
    again = exact.rounded(case, 0, "float16")
    assert again[0] is t and again[1] is s and str(t.dtype) == "float16"
    with pytest.raises(ValueError, match="read-only"):
        t[...] = 0
    ex = exact.case_exact(case, 0, "float16")
    assert exact.case_exact(case, 0, "float16") is ex and not ex.rows.flags.writeable
    np.testing.assert_array_equal(ex.teacher, t.astype(np.float64))  # the exact quantities of the rounded values
    block = np.zeros(1000)
    small = exact._Kept(3 * block.nbytes)
    for i in range(5):
        small.get((i,), lambda i=i: (i, [block.copy()]))
    assert small.used <= small.limit and small.get((4,), lambda: (-1, [])) == 4
    assert small.get((0,), lambda: (-1, [])) == -1  # the oldest entry was dropped


def test_kept_inputs_change_no_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """A cell judged from kept inputs gives the very results it gives with nothing kept."""
    pytest.importorskip("torch")
    from klparity.engine import grid
    from klparity.frameworks import REGISTRY

    sel = grid.Selection(frameworks=("torch",), dtypes=("float16",), devices=("cpu",))
    picked = ("gauss3_8x1000_T1", "masked0.25_8x1000_T1", "nan_4x10_T1")
    # the APIs whose library is installed: the suite skips the others by name (``Api.missing``)
    cells = [c for c in grid.cells(sel) if c.case.id in picked and not c.api.missing()]
    kept = [r.to_dict() for c in cells for r in forward.run_cell(REGISTRY["torch"], c)]
    kept += [r.to_dict() for c in cells for r in forward.run_cell(REGISTRY["torch"], c)]  # from the store
    monkeypatch.setattr(exact, "_KEPT", exact._Kept(0))
    fresh = [r.to_dict() for c in cells for r in forward.run_cell(REGISTRY["torch"], c)]
    assert len(cells) >= 9 and kept == fresh + fresh
