"""Figures of a verdict matrix (matplotlib, Agg) and the self-contained HTML report ``klparity report --html``.

Built from the JSON-able per-check results (``CheckResult.to_dict()``) and the matrix rows
(``report.aggregate``): error/tolerance heatmaps per API × dtype and per API × temperature, the
relative error and error/tolerance against the vocabulary size, and each record's gap to the exact KL against the
temperature, computed from the oracle and the records' formulas (each record's ``gap_figure``).
``write_html`` writes the PNGs next to the page and embeds them in it as base64, so the page needs
nothing else (no script, no stylesheet, no link).
"""

from __future__ import annotations

import base64
import datetime
import functools
import html
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, TwoSlopeNorm
from matplotlib.figure import Figure
from numpy.typing import NDArray

from klparity import apis
from klparity.apis import DIFFERENCES, GRAD_DIFFERENCES, SPECS
from klparity.apis.base import GapFigure
from klparity.engine.report import HEADER, Row, environment, format_rows
from klparity.frameworks import REGISTRY
from klparity.numerics import oracle
from klparity.numerics.cases import TEMPERATURES, Case, cases
from klparity.numerics.dtypes import DTYPE_NAMES, round_to, widen

F64 = NDArray[np.float64]

#: Colour scale of the heatmaps: log10(error / tolerance) from 1e-4 (green) through 1 (the limit) to 10.
LOG_TIGHTNESS_RANGE: Final = (-4.0, 0.0, 1.0)
#: Temperatures and cases of the clipping-gap figure (Gaussian logits as in the quick tier).
CLIP_TEMPERATURES: Final = tuple(float(t) for t in np.geomspace(0.05, 1000.0, 29))
CLIP_CASES: Final = (
    ("N(0, 3²) logits, 8 × 1000", "gauss", (8, 1000), 3.0),
    ("N(0, 3²) logits, 4 × 32000", "gauss", (4, 32000), 3.0),
    ("peaked teacher, 8 × 1000", "peaked", (8, 1000), 12.0),
    ("logits spread over 30, 4 × 100", "spread", (4, 100), 30.0),
)
#: The clipping-gap axis is linear below this many percent and logarithmic above.
GAP_LINEAR_BELOW: Final = 1e-3
#: Cases of the relative-error-vs-C figure: Gaussian logits at the main grid's temperatures, where the KL
#: is far from 0 (a relative error of a KL near 0, e.g. identical logits, says nothing about C).
ERROR_FAMILY: Final = "gauss"
FIGURES: Final = {  # file suffix -> caption
    "tightness-dtype": "Worst error / tolerance per API and dtype over every case and reduction (1 is the "
    "limit; FAIL marks a failed check, whatever its cause).",
    "tightness-temperature": "Worst error / tolerance per API and temperature, one panel per dtype.",
    "error-vs-classes": "Largest relative error (reduced and per-row values; Gaussian logits at T 0.5 to 10) "
    "and worst error / tolerance (every case) against the number of classes C, per framework and dtype.",
    **{gap.name: gap.caption for gap in (s.own("gap_figure") for s in SPECS.values()) if gap is not None},
}


def _float(x: Any) -> float:
    """A result field as float (``to_dict`` writes inf / nan as strings)."""
    return float(x)


def _temperature_of() -> dict[str, float]:
    return {c.id: c.temperature for c in cases("full")}


def _case_shape(case_id: str, by_id: dict[str, Case]) -> tuple[int, ...] | None:
    c = by_id.get(case_id)
    if c is not None:
        return c.shape
    m = re.search(r"_(\d+(?:x\d+)*)_T", case_id)
    return tuple(int(v) for v in m.group(1).split("x")) if m else None


def _short(api: str) -> str:
    """An API id with its module path abbreviated as each adapter says (``short_names``)."""
    for adapter in REGISTRY.values():
        for long, short in adapter.short_names:
            api = api.replace(long, short)
    return api


def _elementwise(framework: str, api_id: str, reduction: str) -> bool:
    """The result of ``reduction`` is one value per class (not per row), as its API's spec says."""
    return reduction == "none" and _none_is_elementwise(framework, api_id)


@functools.cache
def _none_is_elementwise(framework: str, api_id: str) -> bool:
    """Whether the API's 'none' is per class, found once per API (the figures ask for every result)."""
    adapter = REGISTRY.get(framework)
    if adapter is None:
        return False
    api = next((a for d in adapter.dtypes for a in apis.entries(adapter.name, d) if a.id == api_id), None)
    spec = SPECS.get(api.semantics) if api is not None else None
    return bool(spec and spec.none_is_elementwise)


def _worst(results: Iterable[dict[str, Any]], key: Any) -> tuple[dict[Any, float], set[Any]]:
    """Max tightness per key, and the keys holding a failed check."""
    worst: dict[Any, float] = {}
    failed: set[Any] = set()
    for r in results:
        k = key(r)
        if k is None:
            continue
        worst[k] = max(worst.get(k, 0.0), _float(r["tightness"]))
        if not r["ok"]:
            failed.add(k)
    return worst, failed


def _cmap() -> tuple[Colormap, TwoSlopeNorm]:
    """Green (far below the tolerance) through yellow (at it) to red (beyond); gray where there is no data."""
    lo, mid, hi = LOG_TIGHTNESS_RANGE
    return colormaps["RdYlGn_r"].with_extremes(bad="#d9d9d9"), TwoSlopeNorm(vmin=lo, vcenter=mid, vmax=hi)


def _heatmap(ax: Any, grid: F64, failed: NDArray[np.bool_], rows: Sequence[str], cols: Sequence[str]) -> Any:
    """One annotated heatmap of log10(tightness); gray where there is no data."""
    cmap, norm = _cmap()
    lo, _, hi = LOG_TIGHTNESS_RANGE
    with np.errstate(divide="ignore"):
        logs = np.log10(np.where(grid > 0, grid, 10.0**lo))
    shown = np.ma.masked_invalid(np.clip(logs, lo, hi))
    shown = np.ma.masked_where(np.isnan(grid), shown)
    im = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=list(cols))
    ax.set_yticks(range(len(rows)), labels=list(rows))
    for (i, j), v in np.ndenumerate(grid):
        if np.isnan(v):
            continue
        text = "FAIL" if failed[i, j] else f"{v:.2g}"
        light = abs(norm(np.clip(logs[i, j], lo, hi)) - 0.5) > 0.3
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if light else "black",
                fontweight="bold" if failed[i, j] else "normal")  # fmt: skip
    return im


def _colorbar(fig: Figure, im: Any, ax: Any) -> None:
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    ticks = [-4, -3, -2, -1, 0, 1]
    cb.set_ticks(ticks, labels=[f"1e{t}" if t not in (0, 1) else ("1 (limit)" if t == 0 else "10") for t in ticks])
    cb.set_label("error / tolerance")


def _dtypes_of(results: Sequence[dict[str, Any]]) -> list[str]:
    present = {r["dtype"] for r in results}
    return [d for d in DTYPE_NAMES if d in present]


def tightness_by_dtype(results: Sequence[dict[str, Any]]) -> Figure:
    """Heatmap API × dtype of the worst error / tolerance."""
    apis = sorted({r["api"] for r in results})
    dtypes = _dtypes_of(results)
    worst, failed = _worst(results, lambda r: (r["api"], r["dtype"]))
    grid = np.array([[worst.get((a, d), np.nan) for d in dtypes] for a in apis], dtype=np.float64)
    bad = np.array([[(a, d) in failed for d in dtypes] for a in apis], dtype=bool).reshape(grid.shape)
    fig = Figure(figsize=(3.0 + 1.2 * len(dtypes), 1.2 + 0.42 * len(apis)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = _heatmap(ax, grid, bad, [_short(a) for a in apis], dtypes)
    ax.set_title("worst error / tolerance per API and dtype")
    _colorbar(fig, im, ax)
    return fig


def tightness_by_temperature(results: Sequence[dict[str, Any]]) -> Figure:
    """Heatmaps API × temperature of the worst error / tolerance, one per dtype."""
    temp_of = _temperature_of()
    dtypes = _dtypes_of(results)
    apis = sorted({r["api"] for r in results})
    temps = sorted({temp_of[r["case"]] for r in results if r["case"] in temp_of})
    ncols = min(len(dtypes), 2) or 1
    nrows = math.ceil(len(dtypes) / ncols) or 1
    fig = Figure(figsize=(3.8 + 0.62 * len(temps) * ncols, 0.9 + (0.9 + 0.36 * len(apis)) * nrows),
                 layout="constrained")  # fmt: skip
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel())
    for ax in axes[len(dtypes):]:
        ax.set_visible(False)
    im = None
    for ax, d in zip(axes, dtypes, strict=False):
        sub = [r for r in results if r["dtype"] == d]
        worst, failed = _worst(sub, lambda r: (r["api"], temp_of[r["case"]]) if r["case"] in temp_of else None)
        grid = np.array([[worst.get((a, t), np.nan) for t in temps] for a in apis], dtype=np.float64)
        bad = np.array([[(a, t) in failed for t in temps] for a in apis], dtype=bool).reshape(grid.shape)
        im = _heatmap(ax, grid, bad, [_short(a) for a in apis], [f"{t:g}" for t in temps])
        ax.set_title(d)
        ax.set_xlabel("temperature T")
    if im is not None:
        _colorbar(fig, im, axes[: len(dtypes)])
    fig.suptitle("worst error / tolerance per API and temperature")
    return fig


def error_vs_classes(results: Sequence[dict[str, Any]]) -> Figure:
    """Largest relative error and error / tolerance against C, per framework and dtype (log-log)."""
    by_id = {c.id: c for c in cases("full")}
    rel: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    tight: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for r in results:
        shape = _case_shape(r["case"], by_id)
        if not shape:
            continue
        c, key = shape[-1], (r["framework"], r["dtype"])
        tight[key][c] = max(tight[key].get(c, 0.0), _float(r["tightness"]))
        # an elementwise 'none' has the relative error of single terms, not of a KL
        case = by_id.get(r["case"])
        if case and case.family == ERROR_FAMILY and case.temperature in TEMPERATURES \
                and not _elementwise(r["framework"], r["api"], r["reduction"]):  # fmt: skip
            rel[key][c] = max(rel[key].get(c, 0.0), _float(r["max_rel"]))
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_rel, ax_tight = fig.subplots(1, 2)
    for key in sorted(tight):
        fw, d = key
        for ax, data in ((ax_rel, rel), (ax_tight, tight)):
            points = sorted((c, v) for c, v in data[key].items() if math.isfinite(v) and v > 0)
            if points:
                xs, ys = zip(*points, strict=True)
                style = REGISTRY[fw].plot_style if fw in REGISTRY else "o-"
                ax.plot(xs, ys, style, label=f"{fw} {d}", markersize=4)
    for ax, title in ((ax_rel, "largest relative error (Gaussian logits, T 0.5 to 10)"),
                      (ax_tight, "worst error / tolerance (every case)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("classes C (vocabulary size)")
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
    ax_tight.axhline(1.0, color="red", linewidth=1, linestyle="-")
    ax_tight.annotate("tolerance", xy=(0.01, 1.0), xycoords=("axes fraction", "data"), color="red",
                      va="bottom", fontsize=8)  # fmt: skip
    handles, labels = ax_rel.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=8)
    return fig


def gap_data(gap: GapFigure, temperatures: Sequence[float] = CLIP_TEMPERATURES) -> dict[str, tuple[F64, F64]]:
    """Per case: (exact batch-mean KL, the API's batch value) at each temperature.

    Both from float64 formulas on float32-rounded logits; one set of logits per case (the case at T = 1),
    so that only the temperature varies along a curve.
    """
    out = {}
    for label, family, shape, param in CLIP_CASES:
        exact, api = [], []
        teacher, student = (widen(round_to(x, "float32")) for x in Case(family, shape, 1.0, param).logits())
        for t in temperatures:
            exact.append(float(np.mean(oracle.kl_from_logits(teacher, student, t))))
            value = gap.value(oracle.softmax(teacher, t), oracle.softmax(student, t))
            # None: nothing departs, the same number (the two float64 formulas round differently)
            api.append(exact[-1] if value is None else value)
        out[label] = (np.array(exact), np.array(api))
    return out


def gap_figure(gap: GapFigure, temperatures: Sequence[float] = CLIP_TEMPERATURES) -> Figure:
    """Exact vs the API's value, and its relative shortfall, against the temperature."""
    data = gap_data(gap, temperatures)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_val, ax_gap = fig.subplots(1, 2)
    temps = np.asarray(temperatures)
    lowest = 0.0
    for i, (label, (exact, api)) in enumerate(data.items()):
        color = f"C{i}"
        ax_val.plot(temps, exact, "-", color=color, label=f"{label}: exact")
        ax_val.plot(temps, api, "--", color=color, label=f"{label}: {gap.label}")
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(exact > 0, 100.0 * (exact - api) / exact, np.nan)
        ax_gap.plot(temps, rel, "o-", color=color, markersize=3, label=label)
        lowest = min(lowest, float(np.nanmin(rel)) if np.any(np.isfinite(rel)) else 0.0)
    ax_val.set_xscale("log")
    ax_val.set_yscale("log")
    ax_val.set_ylabel("batch-mean KL(p‖q)")
    ax_val.set_title(gap.title_values)
    ax_gap.set_xscale("log")
    ax_gap.set_yscale("symlog", linthresh=GAP_LINEAR_BELOW)  # small gaps (T ≈ 1) stay visible next to 90 %
    ax_gap.set_ylabel(gap.gap_label)
    ax_gap.set_title(gap.title_gap)
    if lowest >= 0.0:  # the API is never above the exact value here: no room for the negative half
        ax_gap.set_ylim(bottom=0.0)
    for ax in (ax_val, ax_gap):
        ax.set_xlabel("temperature T")
        ax.grid(True, which="major", alpha=0.3)
    ax_gap.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------- HTML


_STYLE: Final = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td.l, th.l { text-align: left; }
tr.fail td { background: #fde0dc; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
code { background: #f5f5f5; padding: 0 0.2em; }
"""

_LEFT: Final = ("framework", "API", "dtype", "device", "verdict")


def _cls(column: str) -> str:
    return ' class="l"' if column in _LEFT else ""


def _table(header: Sequence[str], body: Iterable[Sequence[str]], fails: Iterable[bool] | None = None) -> str:
    e = html.escape
    head = "".join(f"<th{_cls(h)}>{e(h)}</th>" for h in header)
    out = [f"<table><tr>{head}</tr>"]
    for line, bad in zip(body, fails or iter(lambda: False, True), strict=False):
        cells = "".join(f"<td{_cls(h)}>{e(c)}</td>" for h, c in zip(header, line, strict=True))
        row_class = ' class="fail"' if bad else ""
        out.append(f"<tr{row_class}>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def gap_figures(frameworks: Sequence[str] | None = None) -> list[GapFigure]:
    """The records' gap figures, for the selected ``frameworks`` (None: every framework)."""
    gaps = [gap for gap in (s.own("gap_figure") for s in SPECS.values()) if gap is not None]
    return [gap for gap in gaps if frameworks is None or gap.framework in frameworks]


def figures(results: Sequence[dict[str, Any]], frameworks: Sequence[str] | None = None) -> dict[str, Figure]:
    """Every figure of the report, by file suffix (``FIGURES``); the heatmaps need results; the records'
    gap figures only for the selected ``frameworks`` (None: every one)."""
    out: dict[str, Figure] = {}
    if results:
        out["tightness-dtype"] = tightness_by_dtype(results)
        out["tightness-temperature"] = tightness_by_temperature(results)
        out["error-vs-classes"] = error_vs_classes(results)
    for gap in gap_figures(frameworks):
        out[gap.name] = gap_figure(gap)
    return out


def write_html(path: str | Path, rows: list[Row], results: Sequence[dict[str, Any]],
               meta: dict[str, Any] | None = None) -> list[Path]:  # fmt: skip
    """Write the self-contained HTML report at ``path`` and its PNG figures next to it; return the PNG paths.

    The PNGs are named ``<stem>-<figure>.png``; the page embeds the same bytes as base64 data URIs.
    """
    page = Path(path)
    page.parent.mkdir(parents=True, exist_ok=True)
    pngs = []
    embedded = []
    for name, fig in figures(results).items():
        png = page.with_name(f"{page.stem}-{name}.png")
        fig.savefig(png, dpi=110)
        pngs.append(png)
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        embedded.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(FIGURES[name])} (<code>{html.escape(png.name)}</code>)"
                        "</figcaption></figure>")  # fmt: skip
    env = environment()
    e = html.escape
    checks, failed = sum(r.checks for r in rows), sum(r.failures for r in rows)
    worst = max((r.tightness for r in rows), default=0.0)
    named = sorted({d for r in rows for d in r.differences})
    diffs = [(n, _difference_text(n)) for n in named]
    failed_checks = [r for r in results if not r["ok"]][:50]
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    by = f" by {e(str(meta['runner']))}" if meta and meta.get("runner") else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>klparity report</title>',
        f"<style>{_STYLE}</style></head><body>",
        "<h1>klparity: KL divergence parity report</h1>",
        f"<p>{checks} checks in {sum(len(r.cells) for r in rows)} cells, <b>{failed} failed</b>; worst error / "
        f"tolerance {worst:.3g}. Generated {e(now)}{by}.</p>",
        "<h2>Environment</h2>",
        _table(["component", "version"], [[k, v] for k, v in env.items()]),
    ]
    if meta:
        parts += ["<h2>Selection</h2>", _table(["option", "value"], [[k, _plain(v)] for k, v in meta.items()])]
    parts += ["<h2>Verdict matrix</h2>", _table(HEADER, format_rows(rows), (bool(r.failures) for r in rows))]
    parts += ["<h2>Figures</h2>", *embedded]
    parts += ["<h2>Documented differences</h2>",
              "<p>Where an API's formula differs from the exact KL by design; each is checked to stay what it is "
              "documented to be.</p>"]  # fmt: skip
    if diffs:
        parts.append("<dl>" + "".join(f"<dt><code>{e(n)}</code></dt><dd>{e(t)}</dd>" for n, t in diffs) + "</dl>")
    else:
        parts.append("<p>None met in this run.</p>")
    if failed_checks:
        parts.append("<h2>Failed checks</h2>")
        parts.append("<ul>" + "".join(
            f"<li><code>{e(r['api'])}</code> {e(r['reduction'])}, {e(r['case'])}, {e(r['dtype'])}, "
            f"{e(r['device'])}: {e('; '.join(r['problems']))}</li>" for r in failed_checks) + "</ul>")  # fmt: skip
    parts.append("</body></html>")
    page.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return pngs


def _plain(v: Any) -> str:
    return ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def _difference_text(name: str) -> str:
    return DIFFERENCES.get(name) or GRAD_DIFFERENCES.get(name, "")
