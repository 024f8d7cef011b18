"""Benchmarks of klparity, as ratios measured side by side in one run (absolute times drift).

    python benchmarks/run.py            # all four figures
    python benchmarks/run.py --skip-suite   # (b) and (c) only, seconds instead of minutes

(a) quick-tier ``pytest -n auto`` wall time / bare ``python -c "import torch, tensorflow"`` time
(b) float64 oracle (kl_from_logits) / torch float32 log_softmax + softmax + kl_div, on (64, 32000)
(c) peak memory of the oracle / size of its input arrays, on a (256, 128256) float32 case
(d) checks per second of the quick tier (from the suite's own report)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
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


def oracle_vs_torch() -> tuple[float, float, float]:
    import torch

    from klparity.oracle import kl_from_logits

    rng = np.random.default_rng(20261128)
    t, s = rng.normal(0, 3, (64, 32000)), rng.normal(0, 3, (64, 32000))
    tt, ts = torch.tensor(t, dtype=torch.float32), torch.tensor(s, dtype=torch.float32)
    fn = torch.nn.functional

    def torch_pipeline() -> object:
        return fn.kl_div(fn.log_softmax(ts / 2.0, -1), fn.softmax(tt / 2.0, -1), reduction="none").sum(-1)

    ours = best_of(lambda: kl_from_logits(t, s, 2.0))
    theirs = best_of(torch_pipeline)
    return ours, theirs, ours / theirs


def oracle_memory() -> tuple[float, float]:
    from klparity.oracle import kl_from_logits

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
    cmd = [sys.executable, "-c", "import torch, tensorflow"]
    return best_of(lambda: subprocess.run(cmd, check=True, capture_output=True), repeat=3)


def quick_tier() -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "-n", "auto", "-q", "-p", "no:cacheprovider",
                        "tests/equivalence", "--klparity-report", str(report)],
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip
        wall = time.perf_counter() - start
        checks = json.loads(report.read_text())["summary"]["checks"]
    return wall, checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-suite", action="store_true", help="skip (a) and (d)")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, numpy {np.__version__}")
    ours, theirs, ratio = oracle_vs_torch()
    print(f"(b) oracle / torch float32 pipeline on (64, 32000): {ours * 1e3:.1f} ms / {theirs * 1e3:.1f} ms"
          f" = {ratio:.2f}   (target <= 1)")
    mem, mib = oracle_memory()
    print(f"(c) oracle peak memory / input size on (256, 128256) float32 ({mib:.0f} MiB of input): {mem:.2f}"
          "   (target <= 1.5)")
    if not args.skip_suite:
        imports = bare_import()
        wall, checks = quick_tier()
        print(f"(a) quick tier pytest -n auto / bare import of torch + tensorflow: {wall:.1f} s / "
              f"{imports:.1f} s = {wall / imports:.1f}   (target <= 3)")
        print(f"(d) checks per second of the quick tier: {checks} checks / {wall:.1f} s = {checks / wall:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
