"""Benchmarks of klparity, as ratios measured side by side in one run (absolute times drift).

    python benchmarks/run.py            # all four figures
    python benchmarks/run.py --skip-suite   # (b) and (c) only, seconds instead of minutes

(a) quick-tier ``pytest -n auto tests/equivalence`` wall time / bare ``python -c "import torch, tensorflow"``
    time: torch + TensorFlow alone, then all frameworks with a cold and a warm JAX compilation cache
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
        from klparity.oracle import kl_from_logits

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
        imports = bare_import()
        with tempfile.TemporaryDirectory() as cache:
            runs = [
                ("torch + tensorflow", *quick_tier("torch,tensorflow", "none")),
                ("all frameworks, cold JAX cache", *quick_tier("", cache)),
                ("all frameworks, warm JAX cache", *quick_tier("", cache)),
            ]
        for label, wall, _checks in runs:
            print(f"(a) quick tier pytest -n auto ({label}) / bare import of torch + tensorflow: {wall:.1f} s / "
                  f"{imports:.1f} s = {wall / imports:.1f}   (target <= 3)")  # fmt: skip
        for label, wall, checks in runs:
            print(f"(d) checks per second of the quick tier ({label}): {checks} checks / {wall:.1f} s = "
                  f"{checks / wall:.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
