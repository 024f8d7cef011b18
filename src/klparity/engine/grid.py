"""The test matrix: which (framework, API, case, dtype, device, layout) cells a tier contains.

Built from names only (no framework import, no random values), so the same list of ids comes out
in every process, whatever ``PYTHONHASHSEED`` is. Whether a cell can run (framework installed,
device present, dtype range large enough) is decided when it runs.
"""

from __future__ import annotations

import glob
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from klparity import apis
from klparity.engine.forward import Cell
from klparity.frameworks import DEVICES, REGISTRY, Adapter
from klparity.numerics.cases import Case, case_by_id, cases
from klparity.numerics.dtypes import DTYPE_NAMES
from klparity.numerics.exact import case_overflow

#: Non-contiguous layouts run for these dtypes in the quick tier (all dtypes in the full tier).
QUICK_LAYOUT_DTYPES = ("float32",)


@dataclass(frozen=True)
class Selection:
    """What the user asked for (pytest options or CLI flags)."""

    frameworks: tuple[str, ...] = tuple(REGISTRY)
    dtypes: tuple[str, ...] = DTYPE_NAMES
    devices: tuple[str, ...] = DEVICES
    tier: str = "quick"
    seed: int = 0

    def __post_init__(self) -> None:
        for name, given, known in (
            ("framework", self.frameworks, tuple(REGISTRY)),
            ("dtype", self.dtypes, DTYPE_NAMES),
            ("device", self.devices, DEVICES),
        ):
            unknown = [g for g in given if g not in known]
            if unknown:
                raise ValueError(f"unknown {name} {unknown[0]!r}; expected some of {', '.join(known)}")


#: device nodes of a GPU a framework could use: NVIDIA, AMD ROCm (kfd), WSL2's paravirtual GPU (dxg)
_GPU_NODE_PATTERNS = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")


def gpu_nodes() -> list[str]:
    """The GPU device nodes present."""
    return [node for pattern in _GPU_NODE_PATTERNS for node in glob.glob(pattern)]


def gpu_possible() -> bool:
    """False only where no framework can see a GPU (Linux without device nodes): GPU cells are then
    not generated, without importing a framework to ask it. Elsewhere each framework is asked when a
    cell runs."""
    return not sys.platform.startswith("linux") or bool(gpu_nodes())


def default_devices() -> tuple[str, ...]:
    """The devices tested unless the user names some: cpu, and gpu where one is possible."""
    return DEVICES if gpu_possible() else ("cpu",)


def split_list(text: str | None, default: Iterable[str]) -> tuple[str, ...]:
    """Parse a comma-separated option value; empty or None means ``default``."""
    if not text:
        return tuple(default)
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _layouts(adapter: Adapter, case: Case, dtype: str, tier: str) -> tuple[str, ...]:
    out = ["contiguous"]
    if tier == "full" or dtype in QUICK_LAYOUT_DTYPES:
        if "strided" in adapter.layouts:
            out.append("strided")
        if "transposed" in adapter.layouts and len(case.shape) >= 2:
            out.append("transposed")
    return tuple(out)


def cells(sel: Selection) -> list[Cell]:
    """Every cell of the selection, in a stable order."""
    out = []
    for fw in sel.frameworks:
        adapter = REGISTRY[fw]
        for dtype in (d for d in sel.dtypes if d in adapter.dtypes):
            for api in apis.entries(adapter.name, dtype):
                for case in cases(sel.tier):
                    for device in sel.devices:
                        for layout in _layouts(adapter, case, dtype, sel.tier):
                            out.append(Cell(fw, api, case, dtype, device, layout))
    return out


_DEVICES: dict[str, tuple[str, ...]] = {}


def _devices(framework: str) -> tuple[str, ...]:
    """The framework's usable devices, asked once per process (they do not change while it runs)."""
    if framework not in _DEVICES:
        _DEVICES[framework] = REGISTRY[framework].devices()
    return _DEVICES[framework]


def cell_by_ids(framework: str, api_id: str, case_id: str, dtype: str, device: str, layout: str) -> Cell:
    """The cell a repro line names (``klparity run-cell``, ``python -m klparity.engine.gradients``); a
    ValueError naming the known APIs or cases when an id is unknown."""
    known = {a.id: a for a in apis.entries(framework, dtype)}
    if api_id not in known:
        raise ValueError(f"unknown API {api_id!r} for {framework} {dtype}; known: {', '.join(known)}")
    return Cell(framework, known[api_id], case_by_id(case_id), dtype, device, layout)


def skip_reason(cell: Cell, shift: int) -> str | None:
    """Why a cell cannot run here and now (framework or the API's library missing, no device, dtype
    overflow), or None."""
    adapter = REGISTRY[cell.framework]
    if not adapter.available():
        return adapter.missing_reason()
    missing = cell.api.missing()
    if missing:
        return missing
    if cell.device not in _devices(cell.framework):
        return f"no {cell.device} device visible to {cell.framework}"
    return case_overflow(cell.case, shift, cell.dtype)
