"""The package layout: the adapter core stands alone, and module paths from before the grouping still import."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import peftkit

CORE = Path(peftkit.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


# __main__ is the command-line entry point (`python -m peftkit`), not part of the core.
@pytest.mark.parametrize("module", sorted(p.name for p in CORE.glob("*.py") if p.name != "__main__.py"))
def test_core_modules_never_import_the_training_stack_or_the_cli(module):
    imported = _imported_modules(CORE / module)
    offending = sorted(n for n in imported if n.startswith(("peftkit.training", "peftkit.cli", "peftkit_plugins")))
    assert not offending, f"peftkit/{module} imports {offending}"


def test_import_peftkit_loads_neither_training_nor_cli():
    code = "import sys, peftkit; print(sorted(m for m in sys.modules if m.startswith(('peftkit.training', 'peftkit.cli'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_old_module_paths_import_the_moved_module_with_a_deprecation_warning():
    code = (
        "import importlib, warnings, peftkit\n"
        "from peftkit._moved import MOVED_MODULES\n"
        "for old, new in MOVED_MODULES.items():\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        moved = importlib.import_module(old)\n"
        "    assert moved is importlib.import_module(new), (old, moved)\n"
        "    assert any(new in str(w.message) and w.category is DeprecationWarning for w in caught), (old, caught)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_wheel_lists_every_package_of_the_source_tree():
    # A package missing from [tool.setuptools] packages is left out of the wheel: the editable install
    # still finds it, so only a fresh install (CI) would notice. Checked here from the source tree.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for name, folder in config["package-dir"].items():
        for init in (root / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(root / folder).parts
            if "__pycache__" not in parts:
                found.add(".".join((name, *parts)))
    assert found - listed == set(), f"packages missing from pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"
