"""Loading the user's loss (``FILE.py:FUNCTION`` or ``module:function``), checking that its signature takes
the declared inputs, and inferring its framework from what its file imports (each adapter's ``import_names``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

from klparity.diagnose.conventions import Convention, LossFn, UsageError
from klparity.diagnose.observe import error_text
from klparity.diagnose.records import FRAMEWORK_IMPORTS, FRAMEWORKS, IMPORT_FRAMEWORK


def check_signature(fn: LossFn, conv: Convention) -> None:
    """Raise ``UsageError`` unless ``fn`` accepts the declared inputs positionally."""
    if not callable(fn):
        raise UsageError(f"{fn!r} is not callable")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins and C functions: nothing to check before calling
    try:
        sig.bind(*range(len(conv.inputs)))
    except TypeError:
        name = getattr(fn, "__name__", "the loss")
        hint = "set --inputs to its arguments in order"
        two = [n for n in conv.inputs if n != "temperature"]
        if len(two) < len(conv.inputs) and _binds(sig, len(two)):  # a loss with no temperature argument
            hint += (f"; it takes {len(two)}: for a loss without a temperature argument, give the one it uses, "
                     f"e.g. --temperature 1 --inputs {','.join(f'{r}_logits' for r in two)}")  # fmt: skip
        raise UsageError(
            f"{name}{sig} cannot take the {len(conv.inputs)} declared inputs ({','.join(conv.inputs)}); {hint}"
        ) from None


def _binds(sig: inspect.Signature, n: int) -> bool:
    """``sig`` accepts ``n`` positional arguments."""
    try:
        sig.bind(*range(n))
    except TypeError:
        return False
    return True


def imported_frameworks(path: Path) -> set[str]:
    """Frameworks a Python file imports (each adapter's ``import_names``: Keras counts as TensorFlow), from its
    syntax tree."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {error_text(e)}") from None
    found = set()
    for node in ast.walk(tree):
        mods: list[str] = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            mods = [node.module]
        for m in mods:
            top = m.split(".")[0]
            if top in IMPORT_FRAMEWORK:
                found.add(IMPORT_FRAMEWORK[top])
    return found


def infer_framework(path: Path | None, given: str | None) -> str:
    """``given``, or the one framework the file imports; ``UsageError`` when that is ambiguous."""
    if given:
        if given not in FRAMEWORKS:
            raise UsageError(f"unknown framework {given!r}; expected one of {', '.join(FRAMEWORKS)}")
        return given
    found = imported_frameworks(path) if path else set()
    if len(found) != 1:
        what = "none of" if not found else f"more than one of ({', '.join(sorted(found))})"
        raise UsageError(f"cannot infer the framework: {path or 'the loss'} imports {what} {FRAMEWORK_IMPORTS}; "
                         f"pass --framework {'|'.join(FRAMEWORKS)}")  # fmt: skip
    return found.pop()


def function_framework(fn: LossFn, given: str | None = None) -> str:
    """``given``, or the framework the function's source file imports."""
    try:
        src = inspect.getsourcefile(fn)
    except TypeError:
        src = None
    return infer_framework(Path(src) if src else None, given)


def load_target(target: str) -> tuple[LossFn, Path | None]:
    """``PATH/TO/FILE.py:FUNCTION`` or ``package.module:FUNCTION`` -> (the function, its file)."""
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(f"expected FILE.py:FUNCTION or module:function, got {target!r}")
    path = Path(where)
    if where.endswith(".py") or path.exists() or "/" in where or "\\" in where:
        if not path.is_file():
            raise UsageError(f"file not found: {where}")
        module = _exec_file(path)
        origin: Path | None = path
    else:
        try:
            spec = importlib.util.find_spec(where)
        except (ImportError, ValueError) as e:
            raise UsageError(f"cannot find module {where!r}: {error_text(e)}") from None
        if spec is None:
            raise UsageError(f"module not found: {where}")
        try:
            module = importlib.import_module(where)
        except Exception as e:  # the user's module: any exception is a usage problem here
            raise UsageError(f"importing {where} failed: {error_text(e)}") from None
        origin = Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    fn = getattr(module, name, None)
    if fn is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                        and getattr(v, "__module__", None) == module.__name__)  # fmt: skip
        raise UsageError(f"{where} has no function {name!r}" + (f"; it defines {', '.join(public)}" if public else ""))
    if not callable(fn):
        raise UsageError(f"{where}:{name} is not a function")
    return fn, origin


def _exec_file(path: Path) -> Any:
    name = f"_klparity_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # the file's own helper modules next to it
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any exception is a usage problem here
        sys.modules.pop(name, None)
        raise UsageError(f"running {path} failed: {error_text(e)}") from None
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    return module
