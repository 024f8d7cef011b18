"""``klparity merge SHARD.json ... -o ALL.json``: fold the reports of a split run into one verdict matrix.

When the suite is split across machines (by framework, by test), every shard writes its own report
(``--klparity-report`` or ``klparity report --json``). Merging folds their matrix rows with the same
fold that combines xdist workers (``report.Collector.merge``): cells united, checks and failures
added, maxima taken, documented differences united; failed checks concatenated. The shards must be
one run split, not several runs: the same tier and seed and selection (the frameworks aside), and no
cell of a row in two shards (it would be counted twice). Environments and package lists that differ
between shards (shards on different machines) are kept, with the differing values joined by " | ".
``klparity compare`` reads the merged file like any other report.
"""

from __future__ import annotations

from pathlib import Path

from klparity.engine.compare import CompareError, Report, load_report
from klparity.engine.report import Collector, write_json
from klparity.frameworks import REGISTRY

#: Selection fields that may differ between the shards of one run (they are united).
_UNITED = ("frameworks",)


def _joined(maps: list[dict[str, str]]) -> dict[str, str]:
    """Key by key: the one value all shards agree on, else their distinct values joined by " | "."""
    keys = sorted({k for m in maps for k in m})
    return {k: " | ".join(dict.fromkeys(m.get(k, "absent") for m in maps)) for k in keys}


def merge(paths: list[str | Path]) -> tuple[Collector, dict[str, object], list[Report]]:
    """Fold the shard reports at ``paths``; (the folded matrix, the merged selection, the shards).
    Raises ``CompareError`` for unreadable, incompatible or overlapping shards."""
    if len(paths) < 2:
        raise CompareError("merge needs at least two shard reports")
    shards = [load_report(p) for p in paths]
    first = shards[0]
    for rep in shards[1:]:
        for k in sorted(set(first.selection) | set(rep.selection)):
            if k not in _UNITED and first.selection.get(k) != rep.selection.get(k):
                raise CompareError(f"{rep.path}: selection {k} {rep.selection.get(k)!r}, but {first.path} has "
                                   f"{first.selection.get(k)!r}: shards of one run share their selection")  # fmt: skip
    collector = Collector()
    owner: dict[tuple[tuple[str, str, str, str], str], str] = {}
    for rep in shards:
        wire_rows = []
        for row in rep.rows.values():
            if row.cell_ids is None:
                raise CompareError(f"{rep.path}: row {row.label} lists no cell ids (written before klparity "
                                   "merge existed); rerun that shard")  # fmt: skip
            for cell in row.cell_ids:
                other = owner.setdefault((row.key, cell), rep.path)
                if other != rep.path:
                    raise CompareError(f"cell {cell} of row {row.label} is in both {other} and {rep.path}: "
                                       "shards must not overlap")  # fmt: skip
            wire_rows.append([*row.key, sorted(row.cell_ids), row.checks, row.failures, row.max_abs, row.max_rel,
                              row.tightness, sorted(row.differences)])  # fmt: skip
        collector.merge({"rows": wire_rows, "failed": rep.failed_checks})
    selection: dict[str, object] = dict(first.selection)
    for k in _UNITED:
        united: dict[str, None] = {}
        for rep in shards:
            value = rep.selection.get(k, [])
            united.update(dict.fromkeys(value if isinstance(value, list) else [value]))
        known = [name for name in REGISTRY if name in united]  # the unsplit run's order: the registry's
        selection[k] = known + [name for name in united if name not in known]
    return collector, selection, shards


def run(paths: list[str | Path], out: str | Path) -> str:
    """Merge ``paths`` into the report file ``out``; the summary line to print."""
    collector, selection, shards = merge(paths)
    rows = collector.rows()
    write_json(out, rows, collector.failed, selection, env=_joined([s.environment for s in shards]),
               installed=_joined([s.packages for s in shards]))  # fmt: skip
    checks, failures = sum(r.checks for r in rows), sum(r.failures for r in rows)
    return (f"merged {len(shards)} shards into {out}: {len(rows)} rows, {sum(len(r.cells) for r in rows)} cells, "
            f"{checks} checks, {failures} failed")  # fmt: skip
