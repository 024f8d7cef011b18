"""Tests of how the plugin spreads tests over xdist workers and which GPU cells it generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from klparity import plugin
from klparity.engine import grid
from klparity.engine.report import Collector, aggregate
from klparity.frameworks import REGISTRY


@pytest.mark.parametrize(
    ("nodeid", "group"),
    [
        ("tests/equivalence/test_forward.py::test_forward[torch.nn.KLDivLoss(log_target=False)-float16-cpu]", "torch"),
        ("tests/equivalence/test_forward.py::test_forward[keras.losses.KLDivergence()-float32-cpu]", "tensorflow"),
        ("tests/equivalence/test_forward.py::test_forward[optax.losses.kl_divergence()-float32]", "jax:float32"),
        ("tests/equivalence/test_forward.py::test_forward[jax.scipy.special.rel_entr-float16-cpu]", "jax:float16"),
        ("tests/equivalence/test_goldens.py::test_goldens[jax-cpu-gauss3_8x10_T1-float16]", "jax:float16"),
        ("tests/equivalence/test_goldens.py::test_goldens[jax-cpu-gauss3_8x10_T1-bfloat16]", "jax:bfloat16"),
        ("tests/equivalence/test_goldens.py::test_goldens[tensorflow-cpu-gauss3_8x10_T1-float16]", "tensorflow"),
        ("tests/equivalence/test_pinned.py::test_pinned_fact[torch.default_reduction_mean]", "torch"),
        ("tests/equivalence/test_forward.py::test_forward[torch.nn.KLDivLoss()-float16-cpu]@torch", "torch"),
        ("tests/unit/test_oracle.py::test_seed_article_example_matches_mpmath", None),
        ("tests/unit/test_oracle.py::test_bad_temperature_is_refused[nan-finite]", None),
    ],
)  # fmt: skip
def test_group_of_reads_the_framework_from_the_test_id(nodeid: str, group: str | None) -> None:
    assert plugin.group_of(nodeid) == group


@pytest.mark.parametrize(
    ("nodeid", "group"),
    [
        ("tests/equivalence/test_forward.py::test_forward[torch.nn.KLDivLoss()-float16-cpu-contiguous-x_T1]",
         "torch:test_forward:float16"),
        ("tests/equivalence/test_gradients.py::test_gradients[keras.losses.KLDivergence()-bfloat16-cpu-x]",
         "tensorflow:test_gradients:bfloat16"),
        ("tests/equivalence/test_goldens.py::test_goldens[jax-cpu-gauss3_8x10_T1-float64]", "jax:test_goldens:float64"),
        ("tests/equivalence/test_pinned.py::test_pinned_fact[torch.default_reduction_mean]", "torch:test_pinned_fact:"),
        ("tests/unit/test_oracle.py::test_seed_article_example_matches_mpmath", None),
    ],
)  # fmt: skip
def test_full_tier_groups_by_framework_test_and_dtype(nodeid: str, group: str | None) -> None:
    assert plugin.group_of(nodeid, fine=True) == group


def test_each_framework_runs_in_one_worker(tmp_path: Path) -> None:
    """The real scheduler under ``-n 2``: a framework's tests share a worker, other tests spread."""
    log = tmp_path / "log.txt"
    (tmp_path / "test_spread.py").write_text(
        textwrap.dedent(
            f"""
            import os, pytest

            IDS = [f"{{fw}}.case{{i}}" for fw in ("torch", "keras", "optax") for i in range(6)]
            IDS += [f"free{{i}}" for i in range(12)]

            @pytest.mark.parametrize("name", IDS)
            def test_x(name):
                with open({str(log)!r}, "a") as f:
                    f.write(f"{{os.environ['PYTEST_XDIST_WORKER']}} {{name}}\\n")
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    cmd = [sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-q", "-p", "no:cacheprovider",
           str(tmp_path / "test_spread.py")]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    workers: dict[str, set[str]] = {}
    for line in log.read_text().splitlines():
        worker, name = line.split()
        workers.setdefault(name.split(".")[0] if "." in name else "free", set()).add(worker)
    assert all(len(workers[fw]) == 1 for fw in ("torch", "keras", "optax")), workers
    assert len(workers["free"]) == 2, workers  # ungrouped tests are not pinned to one worker


def _an_installed_framework() -> str:
    """The first framework of the registry installed here (these tests need one, not a given one)."""
    name = next((n for n, a in REGISTRY.items() if a.available()), None)
    if name is None:
        pytest.skip("no framework installed: pip install 'klparity[torch]' (or any framework's extra)")
    return name


def test_gpu_cells_are_not_generated_without_a_gpu_device_node(monkeypatch: pytest.MonkeyPatch) -> None:
    fw = _an_installed_framework()
    monkeypatch.setattr(grid.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(grid.sys, "platform", "linux")
    assert not grid.gpu_possible() and grid.default_devices() == ("cpu",)
    assert "no GPU device node" in plugin._gpu_hint()
    skip = [m for m in plugin._cell_marks(fw, "gpu") if m.name == "skip"]
    assert skip and "no GPU device node" in skip[0].kwargs["reason"]
    monkeypatch.setattr(grid.glob, "glob", lambda pattern: ["/dev/nvidia0"] if "nvidia" in pattern else [])
    assert grid.gpu_possible() and grid.default_devices() == ("cpu", "gpu")
    assert not [m for m in plugin._cell_marks(fw, "gpu") if m.name == "skip"]


def test_klparity_report_has_the_same_default_devices_as_the_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU device node, `klparity report` neither generates GPU cells nor counts them as skipped."""
    import argparse

    from klparity import cli

    monkeypatch.setattr(grid.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(grid.sys, "platform", "linux")
    args = argparse.Namespace(frameworks=None, dtypes=None, devices=None, tier="quick", seed=0)
    assert cli._selection(args).devices == ("cpu",)
    assert cli._selection(argparse.Namespace(**{**vars(args), "devices": "cpu,gpu"})).devices == ("cpu", "gpu")


def _check(i: int, ok: bool = True) -> dict[str, object]:
    return {"framework": "torch", "api": f"api{i % 2}", "dtype": "float32", "device": "cpu", "case": f"c{i % 5}",
            "layout": "contiguous", "ok": ok, "max_abs": i * 1e-9, "max_rel": i * 1e-10, "tightness": i / 100,
            "differences": [f"d{i % 3}: text"] if i % 4 else []}  # fmt: skip


def test_worker_summaries_merge_into_the_same_matrix() -> None:
    """Each xdist worker folds its checks and the controller merges the summaries: same rows as one process."""
    checks = [_check(i, ok=i != 7) for i in range(40)]
    whole = Collector()
    for c in checks:
        whole.add(c)
    halves = [Collector(), Collector()]
    for i, c in enumerate(checks):
        halves[i % 2].add(c)
    merged = Collector()
    for h in halves:
        merged.merge(h.to_wire())
    assert [r.to_dict() for r in merged.rows()] == [r.to_dict() for r in whole.rows()]
    assert [r.to_dict() for r in whole.rows()] == [r.to_dict() for r in aggregate(checks)]
    assert merged.failed == [checks[7]] and sum(r.failures for r in merged.rows()) == 1


def test_the_json_report_is_the_same_with_and_without_xdist(tmp_path: Path) -> None:
    fw = _an_installed_framework()
    dtype = "float64" if "float64" in REGISTRY[fw].dtypes else "float32"  # MLX has no float64
    reports = {}
    for workers in ("0", "2"):
        out = tmp_path / f"r{workers}.json"
        cmd = [sys.executable, "-m", "pytest", "-n", workers, "-q", "-p", "no:cacheprovider",
               "tests/equivalence/test_forward.py", "-k", "seed_article", "--klparity-frameworks", fw,
               "--klparity-dtypes", dtype, f"--klparity-report={out}"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        done = subprocess.run(cmd, cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        doc = json.loads(out.read_text())
        reports[workers] = (doc["summary"], doc["matrix"])
    assert reports["0"][0]["checks"] > 0
    assert reports["0"] == reports["2"]
