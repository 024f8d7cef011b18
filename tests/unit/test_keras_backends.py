"""Keras 3's ``KLDivergence`` on the JAX and torch backends: the same clipped semantics as on TensorFlow.

``KERAS_BACKEND`` is read once, when Keras is first imported, so each backend runs in its own
subprocess: it computes the loss class under every reduction on the quick cases in float32 (softmax by
``keras.ops`` on that backend) and prints the outputs as JSON. Here they are judged by ``run_cell``
exactly as the TensorFlow adapter's are: against ``keras_formula.keras_kl_divergence`` (clip to [1e-7, 1], no
renormalisation) within the derived tolerance, and against the exact KL through the documented
``keras.clip_epsilon`` difference.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from klparity.engine.forward import Cell, run_cell
from klparity.frameworks import REGISTRY
from klparity.frameworks.keras_adapter import LOSS_CLASS, REDUCTIONS
from klparity.model import Api, CheckResult, Output
from klparity.numerics.cases import cases

DTYPE = "float32"  # the tolerance rows for float16 / bfloat16 are per framework; float32's is shared

SCRIPT = f"""
import json, warnings
import numpy as np
import keras
from klparity.numerics.cases import cases
from klparity.numerics.dtypes import round_to
from klparity.frameworks.keras_adapter import REDUCTIONS

out = {{"backend": keras.backend.backend(), "cells": {{}}}}
for case in cases("quick"):
    t, s = (round_to(x, "{DTYPE}") for x in case.logits(0))
    y_true = keras.ops.softmax(keras.ops.convert_to_tensor(t) / case.temperature, axis=-1)
    y_pred = keras.ops.softmax(keras.ops.convert_to_tensor(s) / case.temperature, axis=-1)
    cell = {{}}
    for red in REDUCTIONS:
        kwargs = {{}} if red == "default" else {{"reduction": red}}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = keras.losses.KLDivergence(**kwargs)(y_true, y_pred)
        cell[red] = {{"value": np.asarray(keras.ops.convert_to_numpy(res), np.float64).tolist(),
                     "dtype": keras.backend.standardize_dtype(res.dtype),
                     "warnings": [str(w.message) for w in caught]}}
    out["cells"][case.id] = cell
print(json.dumps(out))
"""


def _outputs(backend: str) -> dict[str, dict[str, Output]]:
    env = {**os.environ, "KERAS_BACKEND": backend}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["backend"] == backend
    out: dict[str, dict[str, Output]] = {}
    for case_id, cell in data["cells"].items():
        out[case_id] = {red: Output(np.asarray(d["value"], np.float64), d["dtype"], tuple(d["warnings"]))
                        for red, d in cell.items()}  # fmt: skip
    return out


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_kl_divergence_has_the_clipped_semantics_on_backend(backend: str, request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--klparity-tier") != "full":
        pytest.skip("full tier only (--klparity-tier full): a fresh Keras process per backend costs ~5 s")
    for module in ("keras", backend):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    outputs = _outputs(backend)
    api = Api(f"keras[{backend}]", LOSS_CLASS, "keras", REDUCTIONS)
    adapter = REGISTRY["tensorflow"]  # only its compute_dtype is used (floatx(), as on every backend)
    results: list[CheckResult] = []
    for case in cases("quick"):
        cell = Cell(api.framework, api, case, DTYPE, "cpu", "contiguous")
        results += run_cell(adapter, cell, call=lambda *_, out=outputs[case.id]: out)
    bad = [f"{r.case} {r.reduction}: {p}" for r in results if not r.ok for p in r.problems]
    assert not bad, "\n".join(bad)
    main = [r for r in results if " vs own " not in r.reduction]  # the rest: reduction consistency
    assert len(main) == len(cases("quick")) * len(REDUCTIONS)
    # the clip was exercised, and it is what separates the value from the exact KL
    assert {"spread30_4x100_T1", "onehot_8x1000_T1"} <= {
        r.case for r in results if any(d.startswith("keras.clip_epsilon") for d in r.differences)
    }
