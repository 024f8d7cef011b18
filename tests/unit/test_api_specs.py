"""The API-spec registry: one spec per API semantics, everything an API means in its spec, and an engine
that names no framework or API."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from klparity import apis
from klparity.apis import mutation, pinning
from klparity.apis.base import ApiSpec
from klparity.engine import grid, mutants, pinned  # noqa: F401  (importing them registers every fact and mutant)
from klparity.engine.forward import Cell
from klparity.frameworks import REGISTRY
from klparity.model import Api
from klparity.numerics.cases import Case

SRC = Path(apis.__file__).resolve().parents[1]
#: the frameworks and the libraries whose APIs the records cover: no module outside ``apis/`` and
#: ``frameworks/`` names one, in a string or an import
FRAMEWORK_NAMES = frozenset({"torch", "tensorflow", "tf", "jax", "jaxlib", "keras", "optax", "mlx", "paddle", "trl",
                             "torchmetrics", "tf_keras", "flax"})  # fmt: skip
TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: a specific adapter or record, imported by name instead of through the registries
BY_NAME = re.compile(r"^klparity\.(frameworks\.\w+_adapter|apis\.(?!base$|pinning$|mutation$)\w+)")


def _engine_files() -> list[Path]:
    return [p for p in SRC.rglob("*.py") if not {"apis", "frameworks"} & set(p.relative_to(SRC).parts)]


def framework_names(source: str) -> list[tuple[int, str]]:
    """(line, what) for every string constant (docstrings excepted; f-string parts included) holding a
    framework's name as a word, every import of a framework, and every import of one adapter or record."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.add(id(value))
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if FRAMEWORK_NAMES & set(TOKEN.findall(node.value)):
                hits.append((node.lineno, f"string {node.value[:60]!r}"))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.module in ("klparity.apis", "klparity.frameworks"):
                folder = SRC / node.module.split(".")[1]
                modules += [f"{node.module}.{a.name}" for a in node.names
                            if (folder / a.name).is_dir() or (folder / f"{a.name}.py").is_file()]  # fmt: skip
            for m in modules:
                if m.split(".")[0] in FRAMEWORK_NAMES or BY_NAME.match(m):
                    hits.append((node.lineno, f"import {m}"))
    return hits


def test_no_engine_module_names_a_framework() -> None:
    """Outside the adapters and the records, no string and no import names a framework, an adapter or a record."""
    hits = [f"{p.relative_to(SRC)}:{line}: {what}" for p in _engine_files()
            for line, what in framework_names(p.read_text())]  # fmt: skip
    assert not hits, "\n".join(hits)


def test_the_guard_finds_what_it_is_for() -> None:
    for code in ('if api.semantics == "torch": pass', 'x = REGISTRY["tensorflow"]', 'y = f"{a} on jax"',
                 "import torch", "from keras import ops", "from klparity.frameworks.jax_adapter import X",
                 "from klparity.apis.trl_gkd import call", "from klparity.apis import keras_kl_divergence",
                 'z = ("mlx", "float16")'):  # fmt: skip
        assert framework_names(code), code
    for code in ('"""A docstring may name torch."""', 'x = "a torchlight"', "from klparity.apis import SPECS",
                 "from klparity.apis.base import ApiSpec", "from klparity.frameworks import REGISTRY"):  # fmt: skip
        assert not framework_names(code), code


def test_every_api_of_every_adapter_has_a_spec() -> None:
    for adapter in REGISTRY.values():
        for dtype in adapter.dtypes:
            for api in apis.entries(adapter.name, dtype):
                assert isinstance(apis.spec(api), ApiSpec), api.id


def test_specs_register_their_facts_and_mutants() -> None:
    for spec in apis.SPECS.values():
        for module in (spec.facts, spec.mutants):
            if module:
                importlib.import_module(module)
    assert len({m.name for m in mutation.MUTANTS}) == len(mutation.MUTANTS)
    frameworks = set(REGISTRY)
    assert all(f.framework in frameworks for f in pinning.FACTS.values())
    assert all(m.framework in frameworks for m in mutation.MUTANTS)


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
