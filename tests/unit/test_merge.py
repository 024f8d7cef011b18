"""``klparity merge``: shards of one run fold into the matrix of the unsplit run; bad shards exit 2.

Reports are written with ``report.write_json`` from synthetic check results (the real file format).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from klparity import cli
from klparity.engine.report import aggregate, write_json


def _check(framework: str, api: str, dtype: str, case: str, tightness: float, ok: bool = True,
           reduction: str = "sum", differences: tuple[str, ...] = ()) -> dict[str, Any]:  # fmt: skip
    return {
        "framework": framework, "api": api, "reduction": reduction, "dtype": dtype, "device": "cpu",
        "layout": "contiguous", "case": case, "seed": 0, "ok": ok, "max_abs": tightness * 1e-7,
        "max_rel": tightness * 1e-6, "tightness": tightness, "tolerance": 1e-7, "exact_gap": 0.0,
        "problems": [] if ok else [f"error exceeds tolerance ({tightness:g}x)"],
        "differences": list(differences), "reason": "",
    }  # fmt: skip


ALL = [
    _check("torch", "torch.nn.KLDivLoss()", "float32", "gauss3_8x1000_T1", 0.2),
    _check("torch", "torch.nn.KLDivLoss()", "float32", "gauss3_8x1000_T1", 0.3, reduction="batchmean"),
    _check("torch", "torch.nn.KLDivLoss()", "float32", "seed_article_T1", 0.1),
    _check("torch", "torch.nn.KLDivLoss()", "float16", "masked_8x10_T1", 2.0, ok=False),
    _check("tensorflow", "keras.losses.KLDivergence()", "float32", "gauss3_8x1000_T1", 0.4, differences=("d: 1",)),
    _check("tensorflow", "keras.losses.KLDivergence()", "float32", "seed_article_T1", 0.05),
]


def _write(path: Path, results: list[dict[str, Any]], frameworks: list[str]) -> Path:
    write_json(path, aggregate(results), [r for r in results if not r["ok"]],
               {"tier": "quick", "seed": 0, "frameworks": frameworks, "runner": "pytest"})  # fmt: skip
    return path


def _merge(capsys: pytest.CaptureFixture[str], out: Path, *shards: Path) -> tuple[int, str, str]:
    code = cli.main(["merge", *map(str, shards), "-o", str(out)])
    got = capsys.readouterr()
    return code, got.out, got.err


def test_shards_merge_into_the_unsplit_matrix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    whole = _write(tmp_path / "whole.json", ALL, ["torch", "tensorflow"])
    # split by framework, and one row's cells split across two shards (a split by test or duration)
    a = _write(tmp_path / "a.json", [ALL[0], ALL[1], ALL[3]], ["torch"])
    b = _write(tmp_path / "b.json", [ALL[2]], ["torch"])
    c = _write(tmp_path / "c.json", ALL[4:], ["tensorflow"])
    code, out, _ = _merge(capsys, tmp_path / "merged.json", a, b, c)
    assert code == 0 and "merged 3 shards" in out and "6 checks, 1 failed" in out
    merged, unsplit = (json.loads(p.read_text()) for p in (tmp_path / "merged.json", whole))
    assert merged["matrix"] == unsplit["matrix"]
    assert merged["failed_checks"] == unsplit["failed_checks"]
    assert merged["selection"]["frameworks"] == ["torch", "tensorflow"]
    assert cli.main(["compare", str(whole), str(tmp_path / "merged.json")]) == 0
    assert "rows 3 -> 3, 3 unchanged" in capsys.readouterr().out


def test_overlapping_shards_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same cell in two shards would count its checks twice."""
    a = _write(tmp_path / "a.json", ALL[:2], ["torch"])
    b = _write(tmp_path / "b.json", ALL[1:3], ["torch"])
    code, out, err = _merge(capsys, tmp_path / "m.json", a, b)
    assert code == 2 and out == "" and "gauss3_8x1000_T1|contiguous" in err and "must not overlap" in err
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda d: {**d, "selection": {**d["selection"], "seed": 3}}, "selection seed 3"),
        (lambda d: {**d, "selection": {**d["selection"], "tier": "full"}}, "selection tier 'full'"),
        (lambda d: {**d, "matrix": [{k: v for k, v in r.items() if k != "cell_ids"} for r in d["matrix"]]},
         "lists no cell ids"),
        (lambda d: {**d, "matrix": [{**r, "cell_ids": ["x"] * 5} for r in d["matrix"]]}, "'cell_ids' should be"),
    ],
)  # fmt: skip
def test_incompatible_shards_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mangle: Any, message: str
) -> None:
    a = _write(tmp_path / "a.json", ALL[:3], ["torch"])
    b = _write(tmp_path / "b.json", ALL[4:], ["tensorflow"])
    b.write_text(json.dumps(mangle(json.loads(b.read_text()))))
    code, _, err = _merge(capsys, tmp_path / "m.json", a, b)
    assert code == 2 and message in err and "Traceback" not in err


def test_one_shard_is_not_a_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write(tmp_path / "a.json", ALL, ["torch", "tensorflow"])
    code, _, err = _merge(capsys, tmp_path / "m.json", a)
    assert code == 2 and "at least two" in err


def test_shards_from_different_machines_keep_both_environments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _write(tmp_path / "a.json", ALL[:4], ["torch"])
    b = _write(tmp_path / "b.json", ALL[4:], ["tensorflow"])
    doc = json.loads(b.read_text())
    doc["environment"]["cpu"] = "Other CPU (avx2)"
    b.write_text(json.dumps(doc))
    assert _merge(capsys, tmp_path / "m.json", a, b)[0] == 0
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["environment"]["cpu"].endswith(" | Other CPU (avx2)")
    assert merged["packages"] == json.loads(a.read_text())["packages"]
