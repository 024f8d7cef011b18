"""Benchmarks of klparity, as ratios measured side by side in one run (absolute times drift).

    python benchmarks/run.py            # all four figures
    python benchmarks/run.py --skip-suite   # (b) and (c) only, seconds instead of minutes

(a) quick-tier ``pytest -n auto tests/equivalence`` wall time / bare ``python -c "import torch, tensorflow"``
    time: torch + TensorFlow alone, then all frameworks with a cold and a warm JAX compilation cache;
    each suite run is paired with a bare import timed just before it, three rounds, median and range
(b) float64 oracle (kl_from_logits) / torch float32 log_softmax + softmax + kl_div, on (64, 32000)
(c) peak memory of the oracle / size of its input arrays, on a (256, 128256) float32 case
(d) checks per second of the quick tier (from the suite's own report)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def best_of(fn: Callable[[], object], repeat: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _pipeline_inputs() -> tuple[np.ndarray, np.ndarray]:
    """(64, 32000) float32 logits: the values torch sees and the oracle is evaluated on."""
    rng = np.random.default_rng(20261128)
    t = rng.normal(0, 3, (64, 32000)).astype(np.float32)
    s = rng.normal(0, 3, (64, 32000)).astype(np.float32)
    return t, s


def time_pipeline(which: str, temperature: float) -> float:
    """Best time of one pipeline (``oracle`` or ``torch``), in this process, imported alone."""
    t, s = _pipeline_inputs()
    if which == "oracle":
        from klparity.numerics.oracle import kl_from_logits

        return best_of(lambda: kl_from_logits(t, s, temperature), repeat=30)
    import torch

    tt, ts = torch.from_numpy(t), torch.from_numpy(s)
    fn = torch.nn.functional

    def torch_pipeline() -> object:
        return fn.kl_div(
            fn.log_softmax(ts / temperature, -1), fn.softmax(tt / temperature, -1), reduction="none"
        ).sum(-1)

    return best_of(torch_pipeline, repeat=30)


def oracle_vs_torch(temperature: float) -> tuple[float, float, float]:
    """Each pipeline timed in a child process of its own, alternating five times, best of all.

    Separate processes because torch's OpenMP threads keep spinning after each call and would steal
    the oracle's cores (and the oracle's threads torch's) if both ran in one process.
    """
    best = {"oracle": float("inf"), "torch": float("inf")}
    for _ in range(5):
        for which in best:
            cmd = [sys.executable, __file__, "--child", which, str(temperature)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            best[which] = min(best[which], float(out))
    return best["oracle"], best["torch"], best["oracle"] / best["torch"]


def oracle_memory() -> tuple[float, float]:
    from klparity.numerics.oracle import kl_from_logits

    rng = np.random.default_rng(7)
    shape = (256, 128256)
    t = rng.standard_normal(shape, dtype=np.float32) * 3
    s = rng.standard_normal(shape, dtype=np.float32) * 3
    inputs = t.nbytes + s.nbytes
    tracemalloc.start()
    kl_from_logits(t, s, 1.0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / inputs, inputs / 2**20


def bare_import() -> float:
    """Wall time of one ``python -c "import torch, tensorflow"`` in a child."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, tensorflow"], check=True, capture_output=True)
    return time.perf_counter() - start


def quick_tier(frameworks: str, jax_cache: str) -> tuple[float, int]:
    """Wall time and checks of ``pytest -n auto tests/equivalence`` (the quick tier) in a child."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "pytest", "-n", "auto", "-q", "-p", "no:cacheprovider", "tests/equivalence",
               f"--klparity-report={report}", f"--klparity-jax-cache={jax_cache}"]  # fmt: skip
        if frameworks:
            cmd += ["--klparity-frameworks", frameworks]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
        wall = time.perf_counter() - start
        checks = json.loads(report.read_text())["summary"]["checks"]
    return wall, checks


@dataclass
class Suite:
    """One quick-tier configuration, timed ``ROUNDS`` times, each run right after a bare import."""

    label: str
    frameworks: str
    cache: str  #: "none", "cold" (a new empty cache per run) or "warm" (one cache, filled first)
    walls: list[float] = field(default_factory=list)
    imports: list[float] = field(default_factory=list)
    checks: int = 0

    def ratios(self) -> list[float]:
        return sorted(w / b for w, b in zip(self.walls, self.imports, strict=True))


ROUNDS = 3  #: single runs vary by +-10 % on a shared 2-core machine: the median and the range are shown


def time_suites() -> list[Suite]:
    suites = [Suite("torch + tensorflow", "torch,tensorflow", "none"),
              Suite("all frameworks, cold JAX cache", "", "cold"),
              Suite("all frameworks, warm JAX cache", "", "warm")]  # fmt: skip
    with tempfile.TemporaryDirectory() as warm:
        quick_tier("", warm)  # fills the warm cache
        for _ in range(ROUNDS):  # configurations alternate, so that a slow spell of the machine hits all
            for suite in suites:
                with tempfile.TemporaryDirectory() as cold:
                    cache = {"none": "none", "cold": cold, "warm": warm}[suite.cache]
                    suite.imports.append(bare_import())
                    wall, suite.checks = quick_tier(suite.frameworks, cache)
                    suite.walls.append(wall)
    return suites


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-suite", action="store_true", help="skip (a) and (d)")
    ap.add_argument("--child", nargs=2, metavar=("PIPELINE", "T"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(time_pipeline(args.child[0], float(args.child[1])))
        return 0
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, numpy {np.__version__}")
    for temperature in (2.0, 3.0):  # 1/2 is exact (the oracle multiplies), 1/3 is not (it divides)
        ours, theirs, ratio = oracle_vs_torch(temperature)
        print(f"(b) oracle / torch float32 pipeline on (64, 32000), T={temperature:g}: {ours * 1e3:.1f} ms / "
              f"{theirs * 1e3:.1f} ms = {ratio:.2f}   (target <= 1)")
    mem, mib = oracle_memory()
    print(f"(c) oracle peak memory / input size on (256, 128256) float32 ({mib:.0f} MiB of input): {mem:.2f}"
          "   (target <= 1.5)")
    if not args.skip_suite:
        for suite in time_suites():
            r = suite.ratios()
            print(f"(a) quick tier pytest -n auto ({suite.label}) / bare import of torch + tensorflow, "
                  f"median of {ROUNDS} adjacent pairs: {statistics.median(suite.walls):.1f} s / "
                  f"{statistics.median(suite.imports):.1f} s = {statistics.median(r):.2f} "
                  f"(range {r[0]:.2f}-{r[-1]:.2f})   (target <= 3)")  # fmt: skip
            rate = [suite.checks / w for w in suite.walls]
            print(f"(d) checks per second of the quick tier ({suite.label}): {suite.checks} checks / "
                  f"{statistics.median(suite.walls):.1f} s = {statistics.median(rate):.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
