"""``klparity compare``: identical reports merge, a worse cell blocks, malformed input exits 2.

The reports are built with ``report.write_json`` itself from synthetic check results, so the tests
follow the real file format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from klparity import cli
from klparity.engine.report import aggregate, write_json
from klparity.numerics.errormodel import HEADROOM_IGNORE_BELOW, HEADROOM_SHRINK_FACTOR


def _check(api: str, dtype: str, case: str, tightness: float, ok: bool = True) -> dict[str, Any]:
    return {
        "framework": "torch", "api": api, "reduction": "sum", "dtype": dtype, "device": "cpu",
        "layout": "contiguous", "case": case, "seed": 1, "ok": ok, "max_abs": tightness * 1e-7,
        "max_rel": tightness * 1e-6, "tightness": tightness, "tolerance": 1e-7, "exact_gap": 0.0,
        "problems": [] if ok else [f"error exceeds tolerance ({tightness:g}x)"], "differences": [], "reason": "",
    }  # fmt: skip


BASE = [
    _check("torch.nn.KLDivLoss()", "float32", "gauss3_8x1000_T1", 0.2),
    _check("torch.nn.KLDivLoss()", "float32", "seed_article_T1", 0.1),
    _check("torch.nn.KLDivLoss()", "float64", "gauss3_8x1000_T1", 0.05),
    _check("torch.nn.functional.kl_div()", "float16", "gauss3_8x1000_T1", 0.3),
]


def _write(path: Path, results: list[dict[str, Any]], **meta: Any) -> Path:
    selection = {"tier": "quick", "seed": 0, "frameworks": ["torch"], "runner": "test", **meta}
    write_json(path, aggregate(results), results, selection)
    return path


def _run(before: Path, after: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    code = cli.main(["compare", str(before), str(after), *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def _with(index: int, **changes: Any) -> list[dict[str, Any]]:
    results = [dict(r) for r in BASE]
    results[index].update(changes)
    return results


def test_identical_reports_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write(tmp_path / "a.json", BASE)
    code, out, _ = _run(a, a, capsys)
    assert code == 0
    assert "blocking: none" in out and "ok to merge" in out and "3 unchanged" in out


def test_a_new_failure_blocks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _write(tmp_path / "before.json", BASE)
    after = _write(tmp_path / "after.json", _with(1, ok=False, tightness=3.0, problems=["error 3x the tolerance"]))
    code, out, _ = _run(before, after, capsys)
    assert code == 1
    assert "NEW FAILURE" in out and "torch torch.nn.KLDivLoss() float32 cpu" in out
    assert "seed_article_T1" in out and "error 3x the tolerance" in out and "DO NOT MERGE" in out
    # the reverse direction is a fix, not a block
    code, out, _ = _run(after, before, capsys)
    assert code == 0 and "FIXED" in out


def test_tightness_grown_past_the_threshold_blocks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _write(tmp_path / "before.json", BASE)
    grown = 0.05 * HEADROOM_SHRINK_FACTOR * 1.5  # still passing (err/tol < 1), but 6x less headroom
    assert grown < 1.0
    code, out, _ = _run(before, _write(tmp_path / "after.json", _with(2, tightness=grown)), capsys)
    assert code == 1 and "HEADROOM" in out and "torch.nn.KLDivLoss() float64" in out
    # growth within the factor is reported, not blocking
    within = 0.05 * HEADROOM_SHRINK_FACTOR * 0.9
    code, out, _ = _run(before, _write(tmp_path / "within.json", _with(2, tightness=within)), capsys)
    assert code == 0 and "CHANGED" in out
    # a big factor far below the tolerance (a few ulps moving) does not block either
    tiny = _with(2, tightness=HEADROOM_IGNORE_BELOW / 2)
    tiny_before = _write(tmp_path / "tiny_before.json", _with(2, tightness=HEADROOM_IGNORE_BELOW / 1000))
    code, out, _ = _run(tiny_before, _write(tmp_path / "tiny.json", tiny), capsys)
    assert code == 0 and "CHANGED" in out


def test_vanished_rows_block_and_new_rows_and_versions_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _write(tmp_path / "before.json", BASE)
    new_row = _check("torch.new_api()", "float32", "x", 0.1)
    doc = json.loads(_write(tmp_path / "after.json", [*BASE[:3], new_row]).read_text())
    doc["environment"]["torch"] = "9.9.9"
    (tmp_path / "after.json").write_text(json.dumps(doc))
    code, out, _ = _run(before, tmp_path / "after.json", capsys)
    assert code == 1
    assert "VANISHED" in out and "torch.nn.functional.kl_div() float16" in out
    assert "APPEARED" in out and "torch.new_api()" in out
    assert "torch: " in out and "-> 9.9.9" in out
    code, out, _ = _run(before, tmp_path / "after.json", capsys, "--allow-vanished")
    assert code == 0 and "VANISHED" in out


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda d: "{not json", "not valid JSON"),
        (lambda d: {**d, "schema": "klparity-report/0"}, "schema"),
        (lambda d: {k: v for k, v in d.items() if k != "matrix"}, "missing key 'matrix'"),
        (lambda d: {**d, "matrix": [{k: v for k, v in d["matrix"][0].items() if k != "tightness"}]},
         "missing key 'tightness'"),
        (lambda d: {**d, "matrix": [{**d["matrix"][0], "tightness": "lots"}]}, "expected a number"),
        (lambda d: {**d, "matrix": "rows"}, "'matrix' should be list"),
        (lambda d: [1, 2], "expected an object"),
        (lambda d: {**d, "selection": {**d["selection"], "tier": "full"}}, "incompatible runs: tier"),
    ],
)  # fmt: skip
def test_malformed_or_incompatible_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mangle: Any, message: str
) -> None:
    good = _write(tmp_path / "good.json", BASE)
    bad = mangle(json.loads(good.read_text()))
    (tmp_path / "bad.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
    code, out, err = _run(good, tmp_path / "bad.json", capsys)
    assert code == 2 and out == ""
    assert err.startswith("klparity: error:") and message in err and "Traceback" not in err


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _write(tmp_path / "good.json", BASE)
    code, _, err = _run(good, tmp_path / "absent.json", capsys)
    assert code == 2 and "no such file" in err


def test_non_finite_tightness_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _write(tmp_path / "before.json", BASE)
    after = _write(tmp_path / "after.json", _with(3, ok=False, tightness=float("inf")))
    code, out, _ = _run(before, after, capsys)
    assert code == 1 and "err/tol 0.3 -> inf" in out


def test_a_dependency_release_is_named_beside_the_rows_it_moved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dependency drift (the scheduled job's case): every installed distribution is in the report, so a
    release such as ml_dtypes 0.7.0 is named; it blocks only through the rows' own rule."""
    before = _write(tmp_path / "before.json", BASE)
    doc = json.loads(before.read_text())
    assert doc["packages"]["numpy"] and doc["packages"]["pytest"]  # the real environment, names normalised
    doc["packages"] = {**doc["packages"], "ml-dtypes": "0.6.0"}
    (tmp_path / "before.json").write_text(json.dumps(doc))
    moved = json.loads(_write(tmp_path / "after.json", _with(0, tightness=0.25)).read_text())
    moved["packages"] = {**doc["packages"], "ml-dtypes": "0.7.0", "new-dep": "1.0"}
    (tmp_path / "after.json").write_text(json.dumps(moved))
    code, out, _ = _run(before, tmp_path / "after.json", capsys)
    assert code == 0 and "ok to merge" in out
    assert "ml-dtypes 0.6.0 -> 0.7.0" in out and "new-dep absent -> 1.0" in out and "packages (2 of" in out
    assert "CHANGED" in out and "torch.nn.KLDivLoss() float32" in out
    # the same drift with a row that now fails blocks, by the row's rule
    failing = json.loads(_write(tmp_path / "fail.json", _with(0, ok=False, tightness=2.0)).read_text())
    failing["packages"] = moved["packages"]
    (tmp_path / "fail.json").write_text(json.dumps(failing))
    code, out, _ = _run(before, tmp_path / "fail.json", capsys)
    assert code == 1 and "NEW FAILURE" in out and "ml-dtypes 0.6.0 -> 0.7.0" in out
    # an identical environment says so; an old file without packages compares as before
    code, out, _ = _run(before, before, capsys)
    assert code == 0 and "packages: all" in out and "unchanged" in out
    del doc["packages"]
    (tmp_path / "old.json").write_text(json.dumps(doc))
    code, out, _ = _run(tmp_path / "old.json", tmp_path / "after.json", capsys)
    assert code == 0 and "packages" not in out


def test_packages_must_be_an_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _write(tmp_path / "good.json", BASE)
    doc = json.loads(good.read_text())
    doc["packages"] = ["numpy"]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    code, _, err = _run(good, tmp_path / "bad.json", capsys)
    assert code == 2 and "'packages' should be an object" in err
