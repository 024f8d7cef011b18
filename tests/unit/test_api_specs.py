"""The API-spec registry: one spec per API semantics, everything an API means in its spec, and an engine
that names no framework or API."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from klparity import apis, grid, mutants, pinned
from klparity.apis.base import ApiSpec
from klparity.cases import Case
from klparity.checks import Cell
from klparity.frameworks import REGISTRY, Api

SRC = Path(apis.__file__).resolve().parents[1]
#: a comparison with, or a lookup by, a framework's or an API's name
BRANCH = re.compile(
    r"""(==|!=|\bin\b)\s*\(?\s*["'](torch|tensorflow|jax|keras|optax|mlx|paddle|trl)["']"""
    r"""|["'](torch|tensorflow|jax|keras|optax|mlx|paddle|trl)["']\s*(==|!=)"""
    r"""|\.semantics\s*(==|!=|\bin\b)|REGISTRY\[["']|isinstance\([^)]*(Torch|Keras|Jax)Adapter"""
)


def _engine_files() -> list[Path]:
    return [p for p in SRC.rglob("*.py") if not {"apis", "frameworks"} & set(p.relative_to(SRC).parts)]


def test_no_engine_module_branches_on_a_framework_or_api_name() -> None:
    hits = [f"{p.relative_to(SRC)}:{i}: {line.strip()}" for p in _engine_files()
            for i, line in enumerate(p.read_text().splitlines(), 1) if BRANCH.search(line)]  # fmt: skip
    assert not hits, "\n".join(hits)


def test_the_pattern_finds_what_it_is_for() -> None:
    for line in ('if api.semantics == "torch":', 'x = REGISTRY["torch"]', 'if framework in ("jax", "x"):',
                 'if "keras" == name:', "isinstance(adapter, KerasAdapter)"):  # fmt: skip
        assert BRANCH.search(line), line


def test_every_api_of_every_adapter_has_a_spec() -> None:
    for adapter in REGISTRY.values():
        for dtype in adapter.dtypes:
            for api in adapter.apis(dtype):
                assert isinstance(apis.spec(api), ApiSpec), api.id


def test_specs_register_their_facts_and_mutants() -> None:
    for spec in apis.SPECS.values():
        for module in (spec.facts, spec.mutants):
            if module:
                importlib.import_module(module)
    assert len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    frameworks = set(REGISTRY)
    assert all(f.framework in frameworks for f in pinned.FACTS.values())
    assert all(m.framework in frameworks for m in mutants.MUTANTS)


def test_differences_are_unique_across_specs() -> None:
    names = [n for s in apis.SPECS.values() for n in s.differences]
    assert len(names) == len(set(names))
    grad_names = [n for s in apis.SPECS.values() for n in s.grad_differences]
    assert len(grad_names) == len(set(grad_names))


def test_unknown_semantics_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no API spec for semantics 'nope'"):
        apis.spec(Api("torch", "x.y", "nope", ("none",)))


def test_an_api_whose_library_is_absent_skips_naming_its_extra() -> None:
    api = Api("torch", "nowhere.kl", "torch", ("none",), requires=("klparity_no_such_module", "nowhere"))
    assert api.missing() == "klparity_no_such_module is not installed: pip install 'klparity[nowhere]'"
    cell = Cell("torch", api, Case("gauss", (4, 10), 1.0, 3.0), "float32", "cpu", "contiguous")
    if REGISTRY["torch"].available():
        assert grid.skip_reason(cell, 0) == api.missing()


def test_gradient_models_per_api() -> None:
    trl = apis.SPECS["trl_gkd"]
    modelled = [Api("torch", "t", "trl_gkd", ("sum",), (("beta", b), ("labels", "none"))) for b in (0.0, 1.0)]
    assert all(trl.has_gradients(a) for a in modelled)
    assert not trl.has_gradients(Api("torch", "t", "trl_gkd", ("sum",), (("beta", 0.5), ("labels", "none"))))
    assert not trl.has_gradients(Api("torch", "t", "trl_gkd", ("sum",), (("beta", 0.0), ("labels", "last-ignored"))))
    assert not apis.SPECS["optax"].has_gradients() and apis.SPECS["torch"].has_gradients()
