"""The ``klparity`` command: ``report`` (the verdict matrix outside pytest), ``run-cell`` (a repro), ``check``
(a user's distillation loss), and the other subcommands below.

Exit status: 0 when every check passed, 1 when any failed, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence
from typing import Any

from klparity.engine import compare, grid
from klparity.engine.forward import failure_message, run_cell
from klparity.engine.report import HEADER, aggregate, environment, format_rows, write_json
from klparity.frameworks import DEVICES, LAYOUTS, REGISTRY, runs_user_losses
from klparity.numerics import goldens
from klparity.numerics.dtypes import DTYPE_NAMES


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


def _selection(args: argparse.Namespace) -> grid.Selection:
    frameworks = grid.split_list(args.frameworks, [n for n, a in REGISTRY.items() if a.available()])
    try:
        sel = grid.Selection(
            frameworks=frameworks,
            dtypes=grid.split_list(args.dtypes, DTYPE_NAMES),
            devices=grid.split_list(args.devices, grid.default_devices()),
            tier=args.tier,
            seed=args.seed,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name in sel.frameworks:
        if not REGISTRY[name].available():
            raise UsageError(REGISTRY[name].missing_reason())
    if not sel.frameworks:
        raise UsageError("no framework installed: pip install 'klparity[all]'")
    return sel


def cmd_report(args: argparse.Namespace) -> int:
    """Run the matrix, print the table, optionally write JSON; 1 if anything failed."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    sel = _selection(args)
    if args.html and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--html needs matplotlib: pip install 'klparity[report]'")
    console = Console(width=None if sys.stdout.isatty() else 200)
    results: list[dict[str, Any]] = []
    messages: list[str] = []
    skipped = 0
    todo = grid.cells(sel)
    start = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("checking", total=len(todo))
        for cell in todo:
            reason = grid.skip_reason(cell, sel.seed)
            if reason:
                skipped += 1
            else:
                res = run_cell(REGISTRY[cell.framework], cell, sel.seed)
                results += [r.to_dict() for r in res]
                if not all(r.ok for r in res):
                    messages.append(failure_message(cell, sel.seed, res))
            progress.advance(task)
    rows = aggregate(results)
    env = environment()
    table = Table(title="klparity: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "platform"))
    for h in HEADER:
        table.add_column(h, justify="left" if h in ("framework", "API", "dtype", "device", "verdict") else "right")
    for line, row in zip(format_rows(rows), rows, strict=True):
        style = "red" if row.failures else None
        table.add_row(*line, style=style)
    console.print(table)
    for m in messages[: args.max_failures]:
        console.print(m, markup=False, highlight=False)
    failed = sum(r.failures for r in rows)
    console.print(f"{sum(r.checks for r in rows)} checks in {len(results) and sum(len(r.cells) for r in rows)} "
                  f"cells, {failed} failed, {skipped} cells skipped, {time.perf_counter() - start:.1f} s",
                  markup=False)  # fmt: skip
    meta = {"tier": sel.tier, "seed": sel.seed, "frameworks": sel.frameworks, "dtypes": sel.dtypes,
            "devices": sel.devices, "runner": "klparity report"}  # fmt: skip
    if args.json:
        write_json(args.json, rows, results, meta)
        console.print(f"wrote {args.json}", markup=False)
    if args.html:
        from klparity.figures import write_html

        pngs = write_html(args.html, rows, results, meta)
        console.print(f"wrote {args.html} and {', '.join(p.name for p in pngs)} beside it", markup=False)
    return 1 if failed else 0


def cmd_run_cell(args: argparse.Namespace) -> int:
    """Run one cell and print every check (the one-line repro of a failure message)."""
    adapter = REGISTRY.get(args.framework)
    if adapter is None:
        raise UsageError(f"unknown framework {args.framework!r}; known: {', '.join(REGISTRY)}")
    if not adapter.available():
        raise UsageError(adapter.missing_reason())
    try:
        cell = grid.cell_by_ids(args.framework, args.api, args.case, args.dtype, args.device, args.layout)
    except ValueError as e:
        raise UsageError(str(e)) from None
    reason = grid.skip_reason(cell, args.seed)
    if reason:
        print(f"cannot run here: {reason}")
        return 0
    results = run_cell(adapter, cell, args.seed)
    for r in results:
        verdict = "ok  " if r.ok else "FAIL"
        print(f"{r.reduction:>24}: {verdict} max abs {r.max_abs:.3g}, max rel {r.max_rel:.3g}, "
              f"err/tol {r.tightness:.3g}")  # fmt: skip
        for problem in r.problems:
            print(f"{'':>26}{problem}")
    if not all(r.ok for r in results):
        print(failure_message(cell, args.seed, results))
        return 1
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold shard reports into one (exit 2 on unreadable, incompatible or overlapping shards)."""
    from klparity.engine.compare import CompareError
    from klparity.engine.merge import run

    try:
        print(run(args.shards, args.output))
    except CompareError as e:
        raise UsageError(str(e)) from None
    return 0


def cmd_mutate(args: argparse.Namespace) -> int:
    """Run the suite once per mutant (and unmutated under several seeds); 1 if a mutant survived."""
    from klparity.engine import mutants as catalogue
    from klparity.engine.mutate import kill_rate, run_all

    if args.list:
        for m in catalogue.MUTANTS:
            print(f"{m.name:28} {m.framework:11} {m.description}")
        return 0
    try:
        chosen = [catalogue.get(n) for n in grid.split_list(args.mutants, [m.name for m in catalogue.MUTANTS])]
    except ValueError as e:
        raise UsageError(str(e)) from None
    chosen = [m for m in chosen if REGISTRY[m.framework].available()]
    start = time.perf_counter()
    outcomes = run_all(chosen, seeds=range(1, args.seeds + 1), jobs=args.jobs)
    width = max(len(o.name) for o in outcomes)
    for o in outcomes:
        desc = catalogue.BY_NAME[o.name].description if o.name in catalogue.BY_NAME else "false-alarm check"
        print(f"{o.name:{width}}  {o.status:11}  {o.seconds:5.1f} s  {o.killer or '-'}\n{'':{width}}  {desc}")
        if o.detail and o.status == "killed":
            print(f"{'':{width}}  first problem: {o.detail[:160]}")
        elif o.detail and o.status in ("error", "false alarm", "not run"):
            print(f"{'':{width}}  {o.detail}" if o.status == "not run" else o.detail)
    rate = kill_rate(outcomes)
    alarms = sum(o.status in ("false alarm", "error") for o in outcomes if o.name.startswith("unmut"))
    absent = sum(o.status == "not run" for o in outcomes)
    ran = len(chosen) - absent
    print(f"kill rate {rate:.0%} ({sum(o.status == 'killed' for o in outcomes)} of {ran} mutants"
          + (f"; {absent} not run: the library they patch is not installed" if absent else "") + "), "
          f"{alarms} false alarms in {args.seeds} unmutated runs, {time.perf_counter() - start:.0f} s wall")
    return 0 if rate >= args.min_kill_rate and not alarms else 1


def cmd_compare(args: argparse.Namespace) -> int:
    """Print what changed between two reports; 0 ok to merge, 1 blocking changes, 2 bad input."""
    try:
        code, text = compare.run(args.before, args.after, allow_vanished=args.allow_vanished)
    except compare.CompareError as e:
        raise UsageError(str(e)) from None
    print(text)
    return code


def cmd_check(args: argparse.Namespace) -> int:
    """Check a user's distillation loss; 0 right, 1 wrong (with the diagnosis), 2 bad input."""
    from klparity import diagnose

    try:
        conv = diagnose.Convention.parse(args.inputs, args.takes, args.expect, args.masked_vocab, args.temperature)
        dtypes = grid.split_list(args.dtypes, diagnose.DEFAULT_DTYPES)
        try:
            ndims = tuple(int(n) for n in grid.split_list(args.ndim, ("2", "3")))
        except ValueError:
            raise diagnose.UsageError(f"--ndim takes a comma list of 2 and 3, got {args.ndim!r}") from None
        fn, path = diagnose.load_target(args.target)
        framework = diagnose.infer_framework(path, args.framework)
        report = diagnose.check_loss(fn, framework, conv, dtypes=dtypes, ndims=ndims, target=args.target)
    except diagnose.UsageError as e:
        raise UsageError(str(e)) from None
    print(report.text())
    return 0 if report.ok else 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="klparity", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="run the parity matrix and print the verdict table")
    rep.add_argument("--frameworks", default="", help="comma list (default: every installed one)")
    rep.add_argument("--dtypes", default="", help=f"comma list of {', '.join(DTYPE_NAMES)}")
    rep.add_argument("--devices", default="", help=f"comma list of {', '.join(DEVICES)}")
    rep.add_argument("--tier", default="quick", choices=("quick", "full"))
    rep.add_argument("--seed", default=0, type=int, help="shift every case seed")
    rep.add_argument("--json", default=None, metavar="PATH", help="also write the matrix as JSON")
    rep.add_argument("--html", default=None, metavar="PATH", help="also write a self-contained HTML report (verdict "
                     "table, environment, documented differences, figures) and its PNG figures next to it")  # fmt: skip
    rep.add_argument("--max-failures", default=20, type=int, help="failure messages to print")
    rep.set_defaults(func=cmd_report)
    one = sub.add_parser("run-cell", help="run one cell (the repro line of a failure message)")
    one.add_argument("--framework", required=True)
    one.add_argument("--api", required=True)
    one.add_argument("--case", required=True)
    one.add_argument("--dtype", required=True, choices=DTYPE_NAMES)
    one.add_argument("--device", default="cpu", choices=DEVICES)
    one.add_argument("--layout", default="contiguous", choices=LAYOUTS)
    one.add_argument("--seed", default=0, type=int)
    one.set_defaults(func=cmd_run_cell)
    mut = sub.add_parser("mutate", help="prove the suite catches regressions: run it once per mutant")
    mut.add_argument("--list", action="store_true", help="list the catalogue and exit")
    mut.add_argument("--mutants", default="", help="comma list (default: every mutant)")
    mut.add_argument("--seeds", default=5, type=int, help="unmutated runs with seed shifts 1..N")
    mut.add_argument("--jobs", default=2, type=int, help="runs in parallel")
    mut.add_argument("--min-kill-rate", default=1.0, type=float, help="exit 1 below this (default 1.0)")
    mut.set_defaults(func=cmd_mutate)
    cmp = sub.add_parser("compare", help="what changed between two report JSON files; exit 1 if the upgrade "
                         "should not be merged")  # fmt: skip
    cmp.add_argument("before", help="report of the current versions (klparity report --json / --klparity-report)")
    cmp.add_argument("after", help="report of the upgraded versions")
    cmp.add_argument("--allow-vanished", action="store_true", help="rows missing from AFTER are notes, not blocking")
    cmp.set_defaults(func=cmd_compare)
    mrg = sub.add_parser("merge", help="fold the report JSON files of a split run into one verdict matrix")
    mrg.add_argument("shards", nargs="+", help="the shards' reports (klparity report --json / --klparity-report)")
    mrg.add_argument("-o", "--output", required=True, help="the merged report to write")
    mrg.set_defaults(func=cmd_merge)
    gold = sub.add_parser("goldens", help="regenerate or check the mpmath golden files (fixtures/goldens.*)")
    goldens.add_arguments(gold)
    gold.set_defaults(func=goldens.run)
    chk = sub.add_parser("check", help="check a distillation loss against the exact KL; name the bug if it is wrong",
                         description="Run FILE.py:FUNCTION (or module:function) on a grid of cases (float32, "
                         "float64; (B, C) and (B, S, C); T 0.5, 1, 2, 4; masked classes; a NaN logit) and compare "
                         "its value and its gradient w.r.t. the student logits with the exact float64 KL. Exit "
                         "status 0: right; 1: wrong, with the known bug that explains the numbers; 2: bad "
                         "input.")  # fmt: skip
    chk.add_argument("target", metavar="FILE.py:FUNCTION", help="the loss: path/to/file.py:function or module:function")
    chk.add_argument("--framework", default=None, choices=runs_user_losses(),
                     help="default: the one framework the file imports (by the adapters' import names)")  # fmt: skip
    chk.add_argument("--inputs", default="student_logits,teacher_logits,temperature",
                     help="the function's positional arguments, in order: student_*, teacher_* and (unless "
                          "--temperature is given) temperature (default: %(default)s)")  # fmt: skip
    chk.add_argument("--takes", default="logits", choices=("logits", "probs", "log_probs"),
                     help="what student and teacher are: raw logits, or softmax / log_softmax of logits / T "
                          "(computed by the checker in the framework) (default: %(default)s)")  # fmt: skip
    chk.add_argument("--expect", default="hinton",
                     help="what it returns, a comma list: one reduction of the per-row KL(teacher‖student) -- "
                          "mean (over all rows: B for (B, C), B·S tokens for (B, S, C)), batch (sum / B = "
                          "shape[0], the batchmean of log-space APIs), sum, per-token (no reduction) -- and t2 "
                          "(times T², "
                          "Hinton) or no-t2 -- and the divergence: forward-kl (KL(teacher‖student), the "
                          "default), reverse-kl (KL(student‖teacher)) or jsd:BETA (generalized Jensen-Shannon "
                          "with weight BETA on the teacher, as TRL's GKD: jsd:0 is forward-kl, jsd:1 reverse-kl). "
                          "hinton = mean,t2 (default: %(default)s)")  # fmt: skip
    chk.add_argument("--masked-vocab", action="store_true",
                     help="the logits can hold -inf (masked classes): NaN there is a failure, not a note")
    chk.add_argument("--temperature", default=None, type=float,
                     help="the fixed temperature of a loss that does not take one")
    chk.add_argument("--dtypes", default="float32,float64", help="comma list (default: %(default)s)")
    chk.add_argument("--ndim", default="2,3", help="input ranks: 2 = (B, C), 3 = (B, S, C) (default: %(default)s)")
    chk.set_defaults(func=cmd_check)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``klparity`` script."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as e:
        print(f"klparity: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
