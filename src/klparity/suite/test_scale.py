"""Scale tier: KL at LLM vocabulary sizes (C = 128256, 256000; 2**28 elements), only with --klparity-scale."""

from __future__ import annotations

import pytest

from klparity.engine import scale
from klparity.plugin import _SELECTION_KEY, record

pytestmark = pytest.mark.equivalence


def test_scale(kl_scale_cell: scale.ScaleCell, klparity_seed: int, request: pytest.FixtureRequest) -> None:
    """Each reduction matches the API's formula within the error model, judged block by block."""
    cell = kl_scale_cell
    reason = scale.skip_reason(cell)  # before waiting for the lock: a cell that cannot run skips at once
    if reason:
        pytest.skip(reason)
    with scale.exclusive():
        reason = scale.skip_reason(cell)  # memory may have changed while another scale cell ran
        if reason:
            pytest.skip(reason)
        run = scale.run_cell(cell, klparity_seed, group=scale.cells(request.config.stash[_SELECTION_KEY]))
    record(run.results)
    request.node.user_properties.append(("klparity_scale", run.summary()))
    ratio = run.oracle_memory_ratio
    assert ratio is None or ratio <= scale.ORACLE_MEMORY_RATIO, (
        f"the reference's peak memory is {ratio:.2f}x the inputs (limit {scale.ORACLE_MEMORY_RATIO}x): "
        "a block-sized buffer became array-sized"
    )
    if not all(r.ok for r in run.results):
        pytest.fail(scale.failure_message(cell, klparity_seed, run.results), pytrace=False)
