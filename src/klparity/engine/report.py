"""Aggregating check results into the verdict matrix, its terminal table and its JSON file.

A matrix row is (framework, API, reduction-independent API id, dtype, device); it holds the number
of cells and checks, the largest absolute and relative errors, the worst tightness (error /
tolerance) and the number of failures. The JSON file adds the environment: versions of Python,
NumPy, every framework, and the platform.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from klparity.frameworks import REGISTRY

SCHEMA = "klparity-report/1"


@dataclass
class Row:
    """One line of the verdict matrix."""

    framework: str
    api: str
    dtype: str
    device: str
    cells: set[str] = field(default_factory=set)
    checks: int = 0
    failures: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    tightness: float = 0.0
    differences: set[str] = field(default_factory=set)

    @property
    def verdict(self) -> str:
        return "FAIL" if self.failures else "ok"

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("framework", "api", "dtype", "device", "checks", "failures",
                                           "max_abs", "max_rel", "tightness")}  # fmt: skip
        d["cells"] = len(self.cells)
        d["cell_ids"] = sorted(self.cells)  # what `klparity merge` needs to fold shards exactly
        d["differences"] = sorted(self.differences)
        d["verdict"] = self.verdict
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


class Collector:
    """Matrix rows folded check by check, and the failed checks; mergeable across processes.

    An xdist worker folds its own checks and sends one summary at the end (``to_wire``), which the
    controller merges: sending every check's dict with its test report cost the controller ~30 s of
    the two cores in the full tier's 551,294 checks.
    """

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str, str, str], Row] = {}
        self.failed: list[dict[str, Any]] = []

    def fold(
        self,
        key: tuple[str, str, str, str],
        cell: str,
        ok: bool,
        max_abs: float,
        max_rel: float,
        tightness: float,
        differences: Iterable[str],
    ) -> None:
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = Row(*key)
        row.cells.add(cell)
        row.checks += 1
        row.failures += 0 if ok else 1
        row.max_abs = max(row.max_abs, float(max_abs))
        row.max_rel = max(row.max_rel, float(max_rel))
        row.tightness = max(row.tightness, float(tightness))
        row.differences.update(d.split(":")[0] for d in differences)

    def add(self, r: dict[str, Any]) -> None:
        """Fold one check result as ``CheckResult.to_dict()`` gives it."""
        self.fold((r["framework"], r["api"], r["dtype"], r["device"]), f"{r['case']}|{r['layout']}", r["ok"],
                  r["max_abs"], r["max_rel"], r["tightness"], r.get("differences", []))  # fmt: skip
        if not r["ok"]:
            self.failed.append(r)

    def rows(self) -> list[Row]:
        return [self._rows[k] for k in sorted(self._rows)]

    def to_wire(self) -> dict[str, Any]:
        """Plain lists and dicts (what xdist can send from a worker)."""
        rows = [[r.framework, r.api, r.dtype, r.device, sorted(r.cells), r.checks, r.failures, r.max_abs,
                 r.max_rel, r.tightness, sorted(r.differences)] for r in self._rows.values()]  # fmt: skip
        return {"rows": rows, "failed": self.failed}

    def merge(self, wire: dict[str, Any]) -> None:
        """Add another process's ``to_wire`` summary."""
        for framework, api, dtype, device, cells, checks, failures, max_abs, max_rel, tightness, diffs in wire["rows"]:
            key = (framework, api, dtype, device)
            row = self._rows.get(key)
            if row is None:
                row = self._rows[key] = Row(*key)
            row.cells.update(cells)
            row.checks += checks
            row.failures += failures
            row.max_abs = max(row.max_abs, max_abs)
            row.max_rel = max(row.max_rel, max_rel)
            row.tightness = max(row.tightness, tightness)
            row.differences.update(diffs)
        self.failed.extend(wire["failed"])


def aggregate(results: Iterable[dict[str, Any]]) -> list[Row]:
    """Fold per-check dicts (``CheckResult.to_dict()``) into matrix rows, sorted."""
    collector = Collector()
    for r in results:
        collector.add(r)
    return collector.rows()


#: SIMD extensions the frameworks' CPU kernels dispatch on (they change rounding patterns, never a verdict).
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "asimd", "sve")


def _cpu() -> str:
    """The CPU model and its kernel-relevant SIMD extensions (from /proc/cpuinfo where there is one)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = re.search(r"^(?:model name|Model)\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.MULTILINE)
    have = set(flags.group(1).split()) if flags else set()
    isa = [f for f in _ISA_FLAGS if f in have]
    return f"{model.group(1).strip() if model else platform.machine()} ({', '.join(isa) or 'no SIMD flags listed'})"


def environment() -> dict[str, str]:
    """Versions of everything that can change a result, and the CPU the kernels ran on (with
    ``ATEN_CPU_CAPABILITY``, torch's kernel override), without importing any framework."""
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu(),
        "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY", "unset"),
        "numpy": np.__version__,
    }
    for name, adapter in REGISTRY.items():
        env[name] = adapter.version()
    return env


def packages() -> dict[str, str]:
    """Every installed distribution and its version (normalised names, sorted): a dependency's release
    (ml_dtypes, scipy, ...) shows up by name in ``klparity compare``, beside the rows it moved."""
    from importlib import metadata

    out: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out[re.sub(r"[-_.]+", "-", name).lower()] = dist.version
    return dict(sorted(out.items()))


def write_json(
    path: str | Path,
    rows: list[Row],
    results: list[dict[str, Any]],
    meta: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    installed: dict[str, str] | None = None,
) -> None:
    """Write the baseline file: environment, installed packages, selection, matrix rows and per-check
    failures. ``env`` and ``installed`` default to this process's (``klparity merge`` passes the shards')."""
    doc = {
        "schema": SCHEMA,
        "environment": environment() if env is None else env,
        "packages": packages() if installed is None else installed,
        "selection": meta,
        "summary": {
            "checks": sum(r.checks for r in rows),
            "failures": sum(r.failures for r in rows),
            "worst_tightness": max((r.tightness for r in rows), default=0.0),
        },
        "matrix": [r.to_dict() for r in rows],
        "failed_checks": [r for r in results if not r["ok"]],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # e.g. tox's {toxworkdir}/reports on a fresh .tox
    Path(path).write_text(json.dumps(doc, indent=1, default=str) + "\n")


def format_rows(rows: list[Row]) -> list[list[str]]:
    """Matrix rows as table cells (shared by the rich table and the plain pytest summary)."""
    return [
        [r.framework, r.api, r.dtype, r.device, str(len(r.cells)), str(r.checks), f"{r.max_abs:.2g}",
         f"{r.max_rel:.2g}", f"{r.tightness:.2f}", r.verdict]
        for r in rows
    ]  # fmt: skip


HEADER = ["framework", "API", "dtype", "device", "cells", "checks", "max abs", "max rel", "err/tol", "verdict"]


def plain_table(rows: list[Row]) -> str:
    """Fixed-width text table (no dependency on a terminal)."""
    body = [HEADER, *format_rows(rows)]
    widths = [max(len(line[i]) for line in body) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in body)
