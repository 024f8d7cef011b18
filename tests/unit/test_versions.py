"""Versions recorded in reports: a framework's build is part of its version, and report files can be
written into folders that do not exist yet (tox's ``{toxworkdir}/reports`` on a fresh ``.tox``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from klparity.engine.report import aggregate, packages, write_json
from klparity.frameworks import REGISTRY


def test_torch_version_keeps_its_build_label() -> None:
    """The CUDA wheels' metadata says 2.14.1 where ``torch.__version__`` says 2.14.1+cu130: the report
    must show the build (a build change is a change), and must not import torch to find it."""
    torch = pytest.importorskip("torch")
    assert REGISTRY["torch"].version() == torch.__version__


def test_report_records_every_installed_distribution_and_creates_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "report.json"
    write_json(path, aggregate([]), [], {"tier": "quick", "seed": 0})
    doc = json.loads(path.read_text())
    assert doc["packages"] == packages()
    assert {"numpy", "ml-dtypes", "pytest", "rich"} <= set(doc["packages"])  # normalised names
