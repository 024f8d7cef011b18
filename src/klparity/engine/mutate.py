"""Mutation runs: the quick tier once per catalogued mutant, plus unmutated runs as a false-alarm check.

Each run is a separate ``pytest --pyargs klparity.suite -x`` process with ``--klparity-mutant NAME``
and only the mutant's framework selected, so the patch is installed before any test and the first
failing test (the killer) ends the run. Runs go in parallel, one process per job.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from klparity.apis.mutation import MUTANTS
from klparity.model import Mutant, installed

_FAILED = re.compile(r"^FAILED (\S+)", re.MULTILINE)
_PROBLEM = re.compile(r"^\s+- (.+)$", re.MULTILINE)


@dataclass(frozen=True)
class Outcome:
    """Result of one run: ``killed`` / ``survived`` (mutants), ``pass`` / ``false alarm`` (controls)."""

    name: str
    status: str
    killer: str
    seconds: float
    detail: str = ""


def _pytest(args: Sequence[str]) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [sys.executable, "-m", "pytest", "--pyargs", "klparity.suite", "-q", "-x", "-rf",
           "-p", "no:cacheprovider", "--klparity-threads", "1", *args]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def missing(mutant: Mutant) -> str | None:
    """Why a mutant cannot run here: the library it patches is not installed (its cells skip too)."""
    for module, _ in mutant.targets:
        top = module.split(".")[0]
        if not installed(top):
            return f"{top} is not installed"
    return None


def run_mutant(mutant: Mutant, extra: Sequence[str] = ()) -> Outcome:
    """Run the suite with one mutant installed; killed when a test fails."""
    reason = missing(mutant)
    if reason:
        return Outcome(mutant.name, "not run", "", 0.0, reason)
    rc, out, secs = _pytest(["--klparity-mutant", mutant.name, "--klparity-frameworks", mutant.framework, *extra])
    failed = _FAILED.findall(out)
    if rc == 1 and failed:
        problem = _PROBLEM.search(out)
        return Outcome(mutant.name, "killed", failed[0].split("::")[-1], secs, problem.group(1) if problem else "")
    if rc == 0:
        return Outcome(mutant.name, "survived", "", secs)
    return Outcome(mutant.name, "error", "", secs, out[-2000:])


def run_control(seed: int, frameworks: str, extra: Sequence[str] = ()) -> Outcome:
    """Run the unmutated suite under a seed shift; any failure is a false alarm."""
    rc, out, secs = _pytest(["--klparity-seed", str(seed), "--klparity-frameworks", frameworks, *extra])
    failed = _FAILED.findall(out)
    if rc == 0:
        return Outcome(f"unmutated, seed {seed}", "pass", "", secs)
    status = "false alarm" if failed else "error"
    return Outcome(f"unmutated, seed {seed}", status, failed[0] if failed else "", secs, out[-2000:])


def run_all(mutants: Sequence[Mutant] = MUTANTS, seeds: Sequence[int] = (), frameworks: str = "",
            jobs: int = 2, extra: Sequence[str] = ()) -> list[Outcome]:  # fmt: skip
    """Every mutant and every control seed, ``jobs`` processes at a time, in catalogue order."""
    fws = frameworks or ",".join(sorted({m.framework for m in mutants if missing(m) is None}))
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        futures = [pool.submit(run_mutant, m, extra) for m in mutants]
        futures += [pool.submit(run_control, s, fws, extra) for s in seeds]
        return [f.result() for f in futures]


def kill_rate(outcomes: Sequence[Outcome]) -> float:
    """Killed mutants / mutants run (controls and mutants of absent libraries are not counted)."""
    mutants = [o for o in outcomes if o.status in ("killed", "survived", "error") and not o.name.startswith("unmut")]
    return sum(o.status == "killed" for o in mutants) / len(mutants) if mutants else 0.0
