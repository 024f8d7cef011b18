"""The pytest plugin (entry point ``pytest11``): options, header, parametrisation, results.

Hooks only, in the array-api-tests style. It parametrises any test that asks for ``kl_cell`` with
the cells of the selected tier, caps thread pools in xdist workers before any framework loads,
folds every check's result into the verdict matrix (each xdist worker its own, sent to the controller
once at the end), prints the matrix at the end of the run and writes it as JSON with
``--klparity-report``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest

from klparity.engine import grid
from klparity.engine.forward import Cell, failure_message, run_cell
from klparity.engine.report import Collector, environment, plain_table, write_json
from klparity.frameworks import DEVICES, REGISTRY, cap_native_threads
from klparity.model import CheckResult, CompileCache
from klparity.numerics.dtypes import DTYPE_NAMES
from klparity.numerics.exact import ORACLES

_SELECTION_KEY = pytest.StashKey[grid.Selection]()


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("klparity", "KL divergence parity suite")
    g.addoption("--klparity-frameworks", default="", help=f"comma list of {', '.join(REGISTRY)} (default: all)")
    g.addoption("--klparity-devices", default="", help=f"comma list of {', '.join(DEVICES)} (default: all)")
    g.addoption("--klparity-dtypes", default="", help=f"comma list of {', '.join(DTYPE_NAMES)} (default: all)")
    g.addoption("--klparity-tier", default="quick", choices=("quick", "full"), help="case tier (default quick)")
    g.addoption("--klparity-seed", default=0, type=int, help="shift every case seed by N (default 0)")
    g.addoption("--klparity-report", default=None, help="write the verdict matrix as JSON to PATH")
    g.addoption("--klparity-threads", default=None, type=int,
                help="thread cap per process (default: 1 in xdist workers, unset otherwise)")  # fmt: skip
    g.addoption("--klparity-mutant", default=None,
                help="inject a catalogued framework regression (see `klparity mutate --list`)")  # fmt: skip
    g.addoption("--klparity-oracle", default="numpy", choices=ORACLES,
                help="exact per-row KL: numpy (log-space oracle, default) or scipy (sum of "
                     "scipy.special.rel_entr over the float64 softmax, a cross-check)")  # fmt: skip
    for cc in _compile_caches():
        g.addoption(f"--klparity-{cc.option}", default="", metavar="DIR",
                    help=f"{cc.help}: DIR, or 'none' (default: {cc.dirname} in pytest's cache directory, none "
                         "with -p no:cacheprovider)")  # fmt: skip
    g.addoption("--klparity-scale", action="store_true", default=False,
                help="run the scale tier (klparity.engine.scale: C = 128256 and 256000, 2**28 elements, "
                     "several GiB of memory; skipped otherwise)")  # fmt: skip
    parser.addini("klparity_xfails", "file of expected failures: '<id substring>  # reason' per line", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "equivalence: framework-vs-oracle parity checks (the product)")
    config.addinivalue_line("markers", "scale: the scale tier, run with --klparity-scale")
    config.addinivalue_line("markers", "gpu: needs a GPU device visible to its framework; skipped when none is visible")
    # registered by pytest-xdist too; here so that strict markers accept it without xdist
    config.addinivalue_line("markers", "xdist_group(name): run every test of the group in one xdist worker")
    opt = config.option
    try:
        sel = grid.Selection(
            frameworks=grid.split_list(opt.klparity_frameworks, REGISTRY),
            dtypes=grid.split_list(opt.klparity_dtypes, DTYPE_NAMES),
            # no GPU cells unless a GPU could be there, or they are asked for (then skipped, with why)
            devices=grid.split_list(opt.klparity_devices, grid.default_devices()),
            tier=opt.klparity_tier,
            seed=opt.klparity_seed,
        )
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    if opt.klparity_frameworks:  # asked for by name: must be there
        missing = [f for f in sel.frameworks if not REGISTRY[f].available()]
        if missing:
            raise pytest.UsageError(REGISTRY[missing[0]].missing_reason() + " (requested explicitly)")
    if opt.klparity_oracle == "scipy" and importlib.util.find_spec("scipy") is None:
        raise pytest.UsageError("--klparity-oracle scipy needs SciPy: pip install 'klparity[test]'")
    config.stash[_SELECTION_KEY] = sel
    threads = opt.klparity_threads
    if threads is None and os.environ.get("PYTEST_XDIST_WORKER"):
        threads = 1  # -n auto already runs one worker per core
    if threads is not None:
        cap_native_threads(threads)
    for cc in _compile_caches():
        directory = _cache_dir(config, cc)
        if directory:  # read by the adapter when it first imports its framework (in this process only)
            os.environ[cc.env] = directory
    if opt.klparity_mutant:
        from klparity.engine import mutants

        try:
            mutants.install(mutants.get(opt.klparity_mutant))
        except ValueError as e:
            raise pytest.UsageError(str(e)) from None


def selection(config: pytest.Config) -> grid.Selection:
    """The frameworks, dtypes, devices, tier and seed shift this run was asked for."""
    return config.stash[_SELECTION_KEY]


def _compile_caches() -> list[CompileCache]:
    """The persistent compilation caches the adapters offer (one ``--klparity-<option>`` each)."""
    return [a.compile_cache for a in REGISTRY.values() if a.compile_cache is not None]


def _cache_dir(config: pytest.Config, cc: CompileCache) -> str | None:
    """Where a framework keeps compiled kernels between runs (a cold run compiles them all, a warm one none)."""
    choice = getattr(config.option, "klparity_" + cc.option.replace("-", "_"))
    if choice == "none":
        return None
    if choice:
        return str(Path(choice).resolve())
    cache = getattr(config, "cache", None)  # absent with -p no:cacheprovider
    return str(cache.mkdir(cc.dirname)) if cache is not None else None


_NO_GPU_NODE = "no GPU device node (/dev/nvidia*, /dev/kfd, /dev/dxg) on this machine"


def _gpu_hint() -> str:
    nodes = grid.gpu_nodes()
    return f"{len(nodes)} GPU device node(s): {', '.join(nodes)}" if nodes else f"none ({_NO_GPU_NODE})"


def pytest_report_header(config: pytest.Config) -> list[str]:
    sel = config.stash[_SELECTION_KEY]
    env = environment()
    return [
        "klparity: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "platform"),
        f"klparity: tier {sel.tier}, seed shift {sel.seed}, frameworks {','.join(sel.frameworks)}, "
        f"dtypes {','.join(sel.dtypes)}, devices {','.join(sel.devices)}; GPU: {_gpu_hint()}"
        + ("" if "gpu" in sel.devices else " (GPU cells not generated; --klparity-devices gpu makes them skip)"),
        f"klparity: exact KL from the {config.option.klparity_oracle} oracle",
    ]


def _cell_marks(framework: str, device: str) -> list[pytest.MarkDecorator]:
    """Skip when the framework is absent; group by framework so that, under ``--dist loadgroup``,
    a framework is imported (and JAX compiles its kernels) in one worker, not in every one."""
    adapter = REGISTRY[framework]
    marks = [pytest.mark.xdist_group(framework)]
    if not adapter.available():
        marks.append(pytest.mark.skip(reason=adapter.missing_reason()))
    if device == "gpu":
        marks.append(pytest.mark.gpu)
        if not grid.gpu_possible():
            marks.append(pytest.mark.skip(reason=_NO_GPU_NODE))
    return marks


_ID_HEAD = re.compile(r"::(\w+)\[([A-Za-z_]+)")
_ID_DTYPE = re.compile(r"-(" + "|".join(DTYPE_NAMES) + r")(?=-|\]|$)")


def group_of(nodeid: str, fine: bool = False) -> str | None:
    """The xdist group of a test, from its id: its framework, or None for a test of no framework.

    One group per framework and dtype (``jax:float32``) for frameworks with ``fine_groups``; with
    ``fine`` (the full tier, where run time dwarfs imports and one framework's tests would leave the
    other workers idle), one per framework, test function and dtype."""
    head = _ID_HEAD.search(nodeid)
    if head is None:
        return None
    for name, adapter in REGISTRY.items():
        if head.group(2) in adapter.id_prefixes:
            if not (fine or adapter.fine_groups):
                return name
            found = _ID_DTYPE.search(nodeid)
            dtype = found.group(1) if found else ""
            return f"{name}:{head.group(1)}:{dtype}" if fine else f"{name}:{dtype}"
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``: every test of one framework in one worker, found from the test id.

    pytest-xdist 3.8 marks a group by appending ``@group`` to ``item._nodeid``, which pytest 9.2 no
    longer reads (pytest-xdist issue #1386): tests are then spread as if unmarked and every worker
    imports every framework (and JAX compiles each kernel once per worker). This scheduler groups
    by the id's first word instead (``group_of``), whatever the pytest version; other tests are
    spread one by one.
    """
    if config.getoption("dist", None) != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    fine = config.getoption("klparity_tier", "quick") == "full"

    class FrameworkGroups(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid, fine) or nodeid

    return FrameworkGroups(config, log)


class _Parametrisable(Protocol):
    @property
    def framework(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def id(self) -> str: ...


def _parametrize(
    metafunc: pytest.Metafunc,
    argname: str,
    cells: Iterable[_Parametrisable],
    extra: Sequence[pytest.MarkDecorator] = (),
) -> None:
    """One test per cell, with its id, the framework's marks (``_cell_marks``) and ``extra`` first."""
    params = [pytest.param(c, id=c.id, marks=[*extra, *_cell_marks(c.framework, c.device)]) for c in cells]
    metafunc.parametrize(argname, params)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kl_cell" in metafunc.fixturenames:
        _parametrize(metafunc, "kl_cell", grid.cells(metafunc.config.stash[_SELECTION_KEY]))


@pytest.hookimpl(specname="pytest_generate_tests")
def pytest_generate_tests_gradients(metafunc: pytest.Metafunc) -> None:
    """Parametrise ``kl_grad_cell`` with the gradient cells of the selected tier."""
    if "kl_grad_cell" in metafunc.fixturenames:
        from klparity.engine.gradients import grad_cells

        _parametrize(metafunc, "kl_grad_cell", grad_cells(metafunc.config.stash[_SELECTION_KEY]))


@pytest.hookimpl(specname="pytest_generate_tests")
def pytest_generate_tests_scale(metafunc: pytest.Metafunc) -> None:
    """Parametrise ``kl_scale_cell`` with the scale cells of the selection (skipped without --klparity-scale)."""
    if "kl_scale_cell" in metafunc.fixturenames:
        from klparity.engine import scale

        extra = [] if metafunc.config.option.klparity_scale else [pytest.mark.skip(reason=scale.DISABLED_REASON)]
        cells = scale.cells(metafunc.config.stash[_SELECTION_KEY])
        _parametrize(metafunc, "kl_scale_cell", cells, [*extra, pytest.mark.scale])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = config.getini("klparity_xfails")
    if not path:
        return
    entries = []
    for line in (Path(config.rootpath) / path).read_text().splitlines():
        pattern, _, reason = line.partition("#")
        if pattern.strip():
            if not reason.strip():
                raise pytest.UsageError(f"{path}: every expected failure needs a '# reason': {line!r}")
            entries.append((pattern.strip(), reason.strip()))
    for item in items:
        for pattern, reason in entries:
            if pattern in item.nodeid:
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True))


def _recording_runner(
    request: pytest.FixtureRequest, judge: Callable[[Cell, int], list[CheckResult]]
) -> Callable[[Cell], list[CheckResult]]:
    """``run(cell)``: skip when the cell cannot run here, else judge it, record its results, return them."""
    sel = request.config.stash[_SELECTION_KEY]

    def run(cell: Cell) -> list[CheckResult]:
        reason = grid.skip_reason(cell, sel.seed)
        if reason:
            pytest.skip(reason)
        results = judge(cell, sel.seed)
        record(results)
        return results

    return run


@pytest.fixture(scope="session")  # reads only the configuration: made once
def klparity_run(request: pytest.FixtureRequest) -> Callable[[Cell], list[CheckResult]]:
    """Run a cell (skipping when it cannot run here), record its results, return them."""
    oracle_name = request.config.option.klparity_oracle
    return _recording_runner(
        request, lambda cell, seed: run_cell(REGISTRY[cell.framework], cell, seed, oracle_name=oracle_name)
    )


@pytest.fixture(scope="session")  # reads only the configuration: made once
def klparity_grad_run(request: pytest.FixtureRequest) -> Callable[[Cell], list[CheckResult]]:
    """Run a gradient cell (skipping when it cannot run here), record its results, return them."""
    from klparity.engine.gradients import run_grad_cell

    return _recording_runner(request, lambda cell, seed: run_grad_cell(REGISTRY[cell.framework], cell, seed))


@pytest.fixture(scope="session")  # reads only the configuration: made once
def klparity_seed(request: pytest.FixtureRequest) -> int:
    """The ``--klparity-seed`` shift."""
    return request.config.stash[_SELECTION_KEY].seed


def assert_cell(cell: Cell, shift: int, results: list[CheckResult]) -> None:
    """Fail with a standalone message when any check of the cell failed."""
    if not all(r.ok for r in results):
        pytest.fail(failure_message(cell, shift, results), pytrace=False)


#: this process's checks (a worker's, or a single process's); in the xdist controller, every worker's
_COLLECTOR = Collector()


def record(results: list[CheckResult]) -> None:
    """Count a cell's check results in this run's verdict matrix (and JSON report)."""
    for r in results:
        _COLLECTOR.fold((r.framework, r.api, r.dtype, r.device), f"{r.case}|{r.layout}", r.ok, r.max_abs,
                        r.max_rel, r.tightness, r.differences)  # fmt: skip
        if not r.ok:
            _COLLECTOR.failed.append(r.to_dict())


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist controller: merge a finished worker's matrix."""
    wire = getattr(node, "workeroutput", {}).get("klparity")
    if wire:
        _COLLECTOR.merge(wire)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    rows = _COLLECTOR.rows()
    if hasattr(config, "workerinput") or not rows:
        return
    tr = terminalreporter
    tr.section("klparity verdict matrix")
    tr.write_line(plain_table(rows))
    checks, failed = sum(r.checks for r in rows), sum(r.failures for r in rows)
    tr.write_line(f"klparity: {checks} checks in {sum(len(r.cells) for r in rows)} cells, {failed} failed")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if hasattr(config, "workerinput"):  # an xdist worker: send the matrix to the controller
        config.workeroutput["klparity"] = _COLLECTOR.to_wire()  # type: ignore[attr-defined]
        return
    path = config.option.klparity_report
    if not path:
        return
    sel = config.stash[_SELECTION_KEY]
    meta = {"tier": sel.tier, "seed": sel.seed, "frameworks": sel.frameworks, "dtypes": sel.dtypes,
            "devices": sel.devices, "runner": "pytest", "oracle": config.option.klparity_oracle,
            "threads": config.option.klparity_threads or "default (1 per xdist worker)"}  # fmt: skip
    write_json(path, _COLLECTOR.rows(), _COLLECTOR.failed, meta)


@pytest.fixture
def klparity_check_loss() -> Callable[..., Any]:
    """``klparity.testing.assert_distillation_loss``: fails the test with the diagnosis when a loss is wrong.

    ``klparity_check_loss(my_kd_loss)`` checks ``(student_logits, teacher_logits, temperature) -> T² · mean
    KL(teacher‖student)``; keywords as ``klparity check`` (framework, inputs, takes, expect, masked_vocab).
    """
    from klparity.testing import assert_distillation_loss

    return assert_distillation_loss
