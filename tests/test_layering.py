"""Imports run one way. ``kernels`` and ``costmodel`` stand on nothing of ours; ``calibration``
measures kernels and writes tables (it may use both); ``router`` builds on all three; ``bench``
sits on top. A module that imports a package above its own fails here."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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
             for path in (ROOT / package).rglob("*.py")}
    assert {module: names for module, names in wrong.items() if names} == {}
