"""Imports run one way. ``kernels`` and ``costmodel`` stand on nothing of ours; ``calibration``
measures kernels and writes tables (it may use both); ``router`` builds on all three; ``bench``
sits on top. A module that imports a package above its own fails here, and so does a public
function without type hints. ``bench/results`` is not package code: it keeps, as they ran, the
one-off probes behind committed measurements, some of which time variants of a kernel's private
helpers; nothing imports them."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OURS = {"kernels", "costmodel", "router", "calibration", "bench"}
MAY_IMPORT = {  # the packages of ours each layer may import
    "kernels": {"kernels"},
    "costmodel": {"costmodel"},
    "calibration": {"calibration", "kernels", "costmodel"},
    "router": {"router", "kernels", "costmodel", "calibration"},
}


def imported_packages(path):
    """Our top-level packages that a module imports."""
    tree = ast.parse(path.read_text())
    names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and
              node.level == 0]
    return {name.split(".")[0] for name in names} & OURS


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_a_lower_layer_imports_nothing_above_it(package):
    wrong = {str(path.relative_to(ROOT)): sorted(imported_packages(path) - MAY_IMPORT[package])
             for path in package_modules(package)}
    assert {module: names for module, names in wrong.items() if names} == {}


def private_imports(path, package):
    """Modules of *another* of our packages that ``path`` imports by a private name (``x._y``, ``_f``)."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top = node.module.split(".")[0]
            if top in OURS and top != package:
                private = [p for p in node.module.split(".")[1:] if p.startswith("_")]
                private += [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    found.append(f"{node.module}: {private}")
    return found


def package_modules(package):
    """The package's modules, without the probes kept under ``bench/results``."""
    return sorted(path for path in (ROOT / package).rglob("*.py") if RESULTS not in path.parents)


@pytest.mark.parametrize("package", sorted(OURS))
def test_no_package_reaches_into_anothers_private_names(package):
    wrong = {str(path.relative_to(ROOT)): private_imports(path, package) for path in package_modules(package)}
    assert {module: names for module, names in wrong.items() if names} == {}


TRITON_DECORATORS = {"jit", "autotune", "heuristics"}  # Triton kernels: constexpr annotations only


def _is_triton_kernel(node):
    targets = (d.func if isinstance(d, ast.Call) else d for d in node.decorator_list)  # @triton.jit(...) too
    return any(isinstance(t, ast.Attribute) and t.attr in TRITON_DECORATORS for t in targets)


def unannotated_public_functions(path):
    """Public functions and methods of a module that lack a parameter's or the return's type hint."""
    missing = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or _is_triton_kernel(node):
            continue
        params = [a for a in node.args.args + node.args.kwonlyargs if a.arg not in ("self", "cls")]
        if node.returns is None or any(a.annotation is None for a in params):
            missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    return missing


@pytest.mark.parametrize("package", sorted(OURS))
def test_every_public_function_has_type_hints(package):
    paths = package_modules(package)
    assert [name for path in paths for name in unannotated_public_functions(path)] == []
