"""``klparity compare BEFORE.json AFTER.json``: what a framework upgrade changed, and whether to merge.

Both files are verdict matrices written by ``klparity report --json`` or ``pytest --klparity-report``
(``report.write_json``). Rows are matched by (framework, API, dtype, device). Blocking changes (exit
status 1): a row that passed and now fails, or fails more checks; a check that fails now and did
not before; headroom (tolerance / error = 1 / tightness) that shrank by more than
``tolerances.HEADROOM_SHRINK_FACTOR`` while the row uses at least ``HEADROOM_IGNORE_BELOW`` of its
tolerance; a row that vanished (coverage lost). Reported but not blocking: version changes (of the
frameworks, and of every installed distribution by name, so that a dependency's release is named beside
the rows it moved), rows fixed or new, documented differences that appeared or went away, smaller
moves in tightness.
Malformed or incompatible files (another schema, missing keys, another tier or seed) exit 2.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from klparity.engine.report import SCHEMA
from klparity.numerics.errormodel import HEADROOM_IGNORE_BELOW, HEADROOM_SHRINK_FACTOR

RowKey = tuple[str, str, str, str]
_ROW_KEYS = ("framework", "api", "dtype", "device")
_NUMBERS = ("checks", "failures", "max_abs", "max_rel", "tightness")
#: Selection fields that must agree: another tier or seed runs other data, not an upgrade.
_MUST_MATCH = ("tier", "seed")


class CompareError(ValueError):
    """A report file that cannot be compared: unreadable, malformed or incompatible."""


@dataclass
class Row:
    """One matrix row of a report."""

    key: RowKey
    checks: int
    failures: int
    max_abs: float
    max_rel: float
    tightness: float
    differences: frozenset[str]
    cell_ids: frozenset[str] | None = None  #: None in files written before cell ids were recorded

    @property
    def label(self) -> str:
        return " ".join(self.key)


@dataclass
class Report:
    """A validated report file."""

    path: str
    environment: dict[str, str]
    selection: dict[str, Any]
    rows: dict[RowKey, Row]
    failed: dict[tuple[str, ...], str]  #: failing check id -> first problem
    packages: dict[str, str] = field(default_factory=dict)  #: distribution -> version (absent in old files)
    failed_checks: list[dict[str, Any]] = field(default_factory=list)  #: as written


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise CompareError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)  # write_json stores inf / nan as strings
    except ValueError:
        raise CompareError(f"{where}: expected a number, got {value!r}") from None


def _need(d: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict):
        raise CompareError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise CompareError(f"{where}: missing key {key!r}")
    if not isinstance(d[key], kind):
        raise CompareError(f"{where}: {key!r} should be {getattr(kind, '__name__', kind)}, "
                           f"got {type(d[key]).__name__}")  # fmt: skip
    return d[key]


def _check_id(c: dict[str, Any], where: str) -> tuple[str, ...]:
    keys = ("framework", "api", "reduction", "dtype", "device", "layout", "case")
    return tuple(str(_need(c, k, (str, int, float), where)) for k in keys)


def load_report(path: str | Path) -> Report:
    """Read and validate one report file."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise CompareError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CompareError(f"{p}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise CompareError(f"{p}: not valid JSON ({e})") from None
    where = str(p)
    schema = _need(doc, "schema", str, where)
    if schema != SCHEMA:
        raise CompareError(f"{p}: schema {schema!r}, this klparity reads {SCHEMA!r}")
    env = _need(doc, "environment", dict, where)
    selection = _need(doc, "selection", dict, where)
    rows: dict[RowKey, Row] = {}
    for i, r in enumerate(_need(doc, "matrix", list, where)):
        w = f"{where}: matrix[{i}]"
        fw, api, dtype, device = (str(_need(r, k, str, w)) for k in _ROW_KEYS)
        key = (fw, api, dtype, device)
        nums = {k: _number(_need(r, k, (int, float, str), w), f"{w}.{k}") for k in _NUMBERS}
        diffs = r.get("differences", [])
        if not isinstance(diffs, list):
            raise CompareError(f"{w}: 'differences' should be a list")
        if key in rows:
            raise CompareError(f"{w}: duplicate row {' '.join(key)}")
        ids = r.get("cell_ids")
        if ids is not None and (not isinstance(ids, list) or len(ids) != int(_number(r.get("cells", -1), w))):
            raise CompareError(f"{w}: 'cell_ids' should be a list of the row's {r.get('cells')} cells")
        rows[key] = Row(key, int(nums["checks"]), int(nums["failures"]), nums["max_abs"], nums["max_rel"],
                        nums["tightness"], frozenset(map(str, diffs)),
                        None if ids is None else frozenset(map(str, ids)))  # fmt: skip
    failed = {}
    failed_checks = _need(doc, "failed_checks", list, where)
    for i, c in enumerate(failed_checks):
        problems = c.get("problems", []) if isinstance(c, dict) else []
        failed[_check_id(c, f"{where}: failed_checks[{i}]")] = str(problems[0]) if problems else ""
    pkgs = doc.get("packages", {})
    if not isinstance(pkgs, dict):
        raise CompareError(f"{where}: 'packages' should be an object of distribution -> version")
    return Report(where, {str(k): str(v) for k, v in env.items()}, selection, rows, failed,
                  {str(k): str(v) for k, v in pkgs.items()}, failed_checks)  # fmt: skip


# ------------------------------------------------------------------------------ comparison


@dataclass
class Comparison:
    """The outcome: blocking findings, notes, and the lines to print."""

    blocking: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)
    packages: list[str] = field(default_factory=list)  #: installed distributions that changed
    unchanged: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.blocking else 0


def _fmt(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def _pair(before: float, after: float) -> str:
    """``before -> after`` with enough digits to show that they differ."""
    for digits in (3, 6, 9, 17):
        b, a = (f"{x:.{digits}g}" if math.isfinite(x) else str(x) for x in (before, after))
        if b != a or before == after or not (math.isfinite(before) and math.isfinite(after)):
            break
    return f"{b} -> {a}"


def headroom(tightness: float) -> float:
    """Tolerance / error: how many times the error could grow before the check fails."""
    if math.isnan(tightness):
        return 0.0
    return math.inf if tightness == 0 else 1.0 / tightness


def _row_changes(b: Row, a: Row, out: Comparison) -> bool:
    """Record what changed in one row; True if anything did."""
    changed = False
    label = a.label
    if a.failures > b.failures:
        kind = "NEW FAILURE" if b.failures == 0 else "MORE FAILURES"
        out.blocking.append(f"{kind:<13} {label}: {b.failures} -> {a.failures} failed of {a.checks} checks "
                            f"(err/tol {_fmt(b.tightness)} -> {_fmt(a.tightness)})")  # fmt: skip
        changed = True
    elif a.failures < b.failures:
        out.notes.append(f"{'FIXED' if a.failures == 0 else 'FEWER FAILURES':<13} {label}: "
                         f"{b.failures} -> {a.failures} failed")  # fmt: skip
        changed = True
    h_b, h_a = headroom(b.tightness), headroom(a.tightness)
    shrink = h_b / h_a if h_a > 0 else math.inf
    if a.failures == 0 and shrink > HEADROOM_SHRINK_FACTOR and a.tightness >= HEADROOM_IGNORE_BELOW:
        out.blocking.append(f"{'HEADROOM':<13} {label}: tolerance/error {_fmt(h_b)} -> {_fmt(h_a)} "
                            f"({_fmt(shrink)}x less, limit {HEADROOM_SHRINK_FACTOR:g}x; err/tol "
                            f"{_fmt(b.tightness)} -> {_fmt(a.tightness)}, max rel {_fmt(b.max_rel)} -> "
                            f"{_fmt(a.max_rel)})")  # fmt: skip
        changed = True
    elif a.tightness != b.tightness or a.max_rel != b.max_rel:
        out.notes.append(f"{'CHANGED':<13} {label}: err/tol {_pair(b.tightness, a.tightness)}, "
                         f"max rel {_pair(b.max_rel, a.max_rel)}")  # fmt: skip
        changed = True
    if a.checks != b.checks:
        out.notes.append(f"{'CHECKS':<13} {label}: {b.checks} -> {a.checks} checks")
        changed = True
    for d in sorted(a.differences - b.differences):
        out.notes.append(f"{'DIFFERENCE +':<13} {label}: documented difference {d} now applies")
        changed = True
    for d in sorted(b.differences - a.differences):
        out.notes.append(f"{'DIFFERENCE -':<13} {label}: documented difference {d} no longer applies")
        changed = True
    return changed


def _changed(before: dict[str, str], after: dict[str, str]) -> list[tuple[str, str]]:
    """(key, "old -> new") for every key whose value differs, sorted; a missing key reads "absent"."""
    keys = sorted(set(before) | set(after))
    return [(k, f"{before.get(k, 'absent')} -> {after.get(k, 'absent')}") for k in keys
            if before.get(k, "absent") != after.get(k, "absent")]  # fmt: skip


def compare(before: Report, after: Report, *, allow_vanished: bool = False) -> Comparison:
    """Compare two validated reports (raises ``CompareError`` if their selections are incompatible)."""
    for k in _MUST_MATCH:
        if before.selection.get(k) != after.selection.get(k):
            vb, va = before.selection.get(k), after.selection.get(k)
            raise CompareError(f"incompatible runs: {k} {vb!r} in {before.path} but {va!r} in {after.path}; "
                               "compare runs of one selection")  # fmt: skip
    out = Comparison()
    out.environment = [f"{k}: {change}" for k, change in _changed(before.environment, after.environment)]
    if before.packages and after.packages:  # files written before packages were recorded have none
        out.packages = [f"{k} {change}" for k, change in _changed(before.packages, after.packages)]
    for k in sorted(set(before.selection) | set(after.selection)):
        if k not in _MUST_MATCH and before.selection.get(k) != after.selection.get(k):
            out.notes.append(f"{'SELECTION':<13} {k}: {before.selection.get(k)} -> {after.selection.get(k)}")
    for key in sorted(set(before.rows) | set(after.rows)):
        b, a = before.rows.get(key), after.rows.get(key)
        if a is None:
            assert b is not None
            line = f"{'VANISHED':<13} {b.label}: {b.checks} checks no longer run (coverage lost)"
            (out.notes if allow_vanished else out.blocking).append(line)
        elif b is None:
            if a.failures:
                out.blocking.append(f"{'NEW FAILURE':<13} {a.label}: new row, {a.failures} of {a.checks} checks fail")
            else:
                out.notes.append(f"{'APPEARED':<13} {a.label}: {a.checks} checks, err/tol {_fmt(a.tightness)}")
        elif not _row_changes(b, a, out):
            out.unchanged += 1
    new_checks = [c for c in after.failed if c not in before.failed]
    for c in new_checks[:20]:
        out.blocking.append(f"{'  failing now':<13} {' '.join(c)}: {after.failed[c]}")
    if len(new_checks) > 20:
        out.blocking.append(f"{'':<13} ... and {len(new_checks) - 20} more newly failing checks")
    return out


def render(before: Report, after: Report, result: Comparison) -> str:
    """Human-readable text of a comparison."""
    lines = [f"klparity compare: {before.path} -> {after.path}"]
    lines.append("environment: unchanged" if not result.environment else "environment:")
    lines += [f"  {e}" for e in result.environment]
    if before.packages and after.packages:
        n = len(set(before.packages) | set(after.packages))
        lines.append(f"packages ({len(result.packages)} of {n} changed):" if result.packages
                     else f"packages: all {n} unchanged")  # fmt: skip
        lines += [f"  {p}" for p in result.packages]
    sel = after.selection
    lines.append(f"selection: tier {sel.get('tier')}, seed {sel.get('seed')}; rows {len(before.rows)} -> "
                 f"{len(after.rows)}, {result.unchanged} unchanged")  # fmt: skip
    fails = [sum(r.failures for r in x.rows.values()) for x in (before, after)]
    checks = [sum(r.checks for r in x.rows.values()) for x in (before, after)]
    lines.append(f"failures: {fails[0]} -> {fails[1]} (checks {checks[0]} -> {checks[1]})")
    lines.append(f"blocking ({len(result.blocking)}):" if result.blocking else "blocking: none")
    lines += [f"  {b}" for b in result.blocking]
    if result.notes:
        lines.append(f"notes ({len(result.notes)}):")
        lines += [f"  {n}" for n in result.notes]
    lines.append(f"rule: block on new failures, lost rows, or headroom (tolerance/error) shrinking more than "
                 f"{HEADROOM_SHRINK_FACTOR:g}x where err/tol >= {HEADROOM_IGNORE_BELOW:g}")  # fmt: skip
    lines.append("verdict: " + ("DO NOT MERGE" if result.blocking else "ok to merge"))
    return "\n".join(lines)


def run(before_path: str | Path, after_path: str | Path, *, allow_vanished: bool = False) -> tuple[int, str]:
    """Load, compare and render; (exit status, text). Raises ``CompareError`` for bad input."""
    before, after = load_report(before_path), load_report(after_path)
    result = compare(before, after, allow_vanished=allow_vanished)
    return result.exit_code, render(before, after, result)
