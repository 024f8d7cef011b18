"""``klparity report --html``: one self-contained page (figures embedded, no external reference) plus its PNGs.

Runs a handful of torch float32 cells (a failure injected into one result) instead of the matrix, to stay fast.
"""

from __future__ import annotations

import base64
import copy
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from klparity import cli
from klparity.apis import DIFFERENCES, SPECS
from klparity.engine import grid
from klparity.engine.forward import Cell, run_cell
from klparity.engine.report import aggregate, environment
from klparity.frameworks import REGISTRY
from klparity.numerics.cases import case_by_id

pytest.importorskip("matplotlib")
from klparity import figures

CASES = ("gauss3_8x1000_T0.5", "gauss3_2x4x100_T5", "masked0.25_8x1000_T1", "gauss1_4x10_T1")


class _Page(HTMLParser):
    """Every tag and attribute of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _cells() -> list[Cell]:
    adapter = REGISTRY["torch"]
    api = next(a for a in adapter.apis("float32") if a.entry == "torch.nn.functional.kl_div")
    return [Cell("torch", api, case_by_id(c), "float32", "cpu", "contiguous") for c in CASES]


@pytest.fixture(scope="module")
def results() -> list[dict[str, Any]]:
    """The cells' results, all passing, plus one copy marked failed."""
    pytest.importorskip("torch")
    out = [r.to_dict() for cell in _cells() for r in run_cell(REGISTRY["torch"], cell)]
    assert out and all(r["ok"] for r in out)
    bad = copy.deepcopy(out[0])
    bad.update(ok=False, tightness=3.5, problems=["error 1e-3 exceeds tolerance 2e-4 (injected)"])
    return [*out[1:], bad]


@pytest.fixture(scope="module")
def written(results: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The page (in a folder that does not exist yet) and its PNGs."""
    page = tmp_path_factory.mktemp("html") / "out" / "report.html"
    return page, figures.write_html(page, aggregate(results), results, {"tier": "quick", "runner": "test"})


def test_html_is_self_contained_and_embeds_every_figure(written: tuple[Path, list[Path]]) -> None:
    page, pngs = written
    assert [p.name for p in pngs] == [f"report-{name}.png" for name in figures.FIGURES]
    files = {p.read_bytes() for p in pngs}
    assert all(b.startswith(b"\x89PNG\r\n\x1a\n") and len(b) > 10_000 for b in files)
    text = page.read_text(encoding="utf-8")
    parser = _Page()
    parser.feed(text)
    imgs = [a for tag, a in parser.tags if tag == "img"]
    prefix = "data:image/png;base64,"
    assert len(imgs) == len(pngs) and all(str(a.get("src", "")).startswith(prefix) for a in imgs)
    assert {base64.b64decode(str(a["src"])[len(prefix):]) for a in imgs} == files  # the same bytes as the PNGs
    # nothing fetched from elsewhere: no script, stylesheet link, frame, or URL of any kind
    assert not [tag for tag, _ in parser.tags if tag in ("script", "link", "iframe", "object", "embed")]
    refs = [v for _, a in parser.tags for k, v in a.items() if k in ("src", "href", "srcset", "action") and v]
    assert all(v.startswith("data:") for v in refs), refs
    assert "http://" not in text and "https://" not in text and "url(" not in text


def test_html_holds_verdicts_environment_and_differences(written: tuple[Path, list[Path]]) -> None:
    text = written[0].read_text(encoding="utf-8")
    assert "torch.nn.functional.kl_div(log_target=False)" in text
    assert '<tr class="fail">' in text and ">FAIL<" in text  # the injected failure, in the verdict table
    assert "error 1e-3 exceeds tolerance 2e-4 (injected)" in text  # ... and in the failed checks
    assert f"<td>{environment()['torch']}</td>" in text
    assert "<code>torch.masked_class_nan</code>" in text  # the masked case meets it
    assert DIFFERENCES["torch.masked_class_nan"].split(";")[0].replace("'", "&#x27;") in text


def test_clip_gap_shrinks_with_temperature_and_vanishes() -> None:
    gap_figure = SPECS["keras"].gap_figure
    assert gap_figure is not None
    data = figures.gap_data(gap_figure, (0.1, 0.5, 1.0, 10.0))
    exact, clipped = data[figures.CLIP_CASES[0][0]]
    gap = (exact - clipped) / exact
    assert gap[0] > gap[1] > gap[2] > 0.0  # Keras is below the exact KL, more so at low T
    assert gap[0] > 0.5 and gap[3] == 0.0  # most of it at T = 0.1; nothing is clipped at T = 10


def test_report_html_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    monkeypatch.setattr(grid, "cells", lambda sel: _cells()[:2])
    page = tmp_path / "r.html"
    argv = ["report", "--frameworks", "torch", "--dtypes", "float32", "--devices", "cpu", "--html", str(page)]
    assert cli.main(argv) == 0
    assert page.is_file() and (tmp_path / "r-keras-clip-gap.png").is_file()
    assert f"wrote {page}" in capsys.readouterr().out

    real = cli.importlib.util.find_spec

    def no_matplotlib(name: str, *args: Any) -> Any:
        return None if name == "matplotlib" else real(name, *args)

    monkeypatch.setattr(cli.importlib.util, "find_spec", no_matplotlib)
    assert cli.main(argv) == 2
    assert "pip install 'klparity[report]'" in capsys.readouterr().err
