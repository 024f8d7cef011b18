"""Collection is deterministic: the same test ids whatever PYTHONHASHSEED, with no random values."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@cache
def _collect(hashseed: str, *extra: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": hashseed}
    env.pop("PYTEST_XDIST_WORKER", None)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/equivalence/test_forward.py", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [line for line in out.stdout.splitlines() if "::" in line]


def test_collected_ids_do_not_depend_on_hash_seed() -> None:
    first, second = _collect("1"), _collect("4242")
    assert len(first) > 1000
    assert first == second


def test_seed_shift_changes_data_not_ids() -> None:
    assert _collect("4242") == _collect("4242", "--klparity-seed", "3")


def test_tier_and_selection_options_shape_the_grid() -> None:
    quick = _collect("1")
    only_f32 = _collect("1", "--klparity-dtypes", "float32", "--klparity-devices", "cpu")
    assert only_f32 and set(only_f32) < set(quick)
    assert all("-float32-cpu-" in line for line in only_f32)
