"""Parity against frozen goldens: each framework's KL rows and batch reduction vs mpmath references.

The forward tests judge a framework against the float64 oracle, so a bug shared by the oracle and a
framework could cancel out. Here the reference is the golden file (``klparity.numerics.goldens``); the
runner and what each record expects are in ``klparity.engine.goldens``.
"""

from __future__ import annotations

import pytest

from klparity.engine import goldens as runner
from klparity.engine.goldens import GoldenCell
from klparity.frameworks import REGISTRY
from klparity.numerics import goldens
from klparity.plugin import _cell_marks, record, selection

pytestmark = pytest.mark.equivalence


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "golden_cell" not in metafunc.fixturenames:
        return
    config = metafunc.config
    directory = goldens.locate(config.rootpath)
    if directory is None:
        reason = (f"golden files not found under {config.rootpath / 'fixtures'}: run from a source "
                  f"checkout or set ${goldens.ENV_DIR} to the folder holding {goldens.MANIFEST_NAME}")  # fmt: skip
        metafunc.parametrize("golden_cell", [pytest.param(None, id="goldens-missing",
                                                          marks=pytest.mark.skip(reason=reason))])  # fmt: skip
        return
    manifest = goldens.read_manifest(directory)
    sel = selection(config)
    quick = sel.tier == "quick"
    params = []
    for fw in sel.frameworks:
        adapter = REGISTRY[fw]
        for device in sel.devices:
            marks = _cell_marks(fw, device)  # skip if absent, gpu mark, one xdist group per framework
            for case in manifest["cases"]:
                if quick and not runner.in_quick_tier(case["id"]):
                    continue
                if case["dtype"] in sel.dtypes and case["dtype"] in adapter.dtypes:
                    cell = GoldenCell(fw, device, case["id"], case["dtype"], directory)
                    params.append(pytest.param(cell, id=f"{fw}-{device}-{case['id']}", marks=marks))
    metafunc.parametrize("golden_cell", params)


def test_goldens(golden_cell: GoldenCell) -> None:
    """Every API of the framework reproduces the golden KL rows and batch reduction (and, where its
    record has one, the golden gradient) within the derived tolerance, or differs exactly as documented."""
    results = runner.run(golden_cell)
    if isinstance(results, str):
        pytest.skip(results)
    record(results)
    if not all(r.ok for r in results):
        pytest.fail(runner.message(golden_cell, results), pytrace=False)
